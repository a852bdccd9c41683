"""A model's sentence-transformers pipeline: run as declared, or refused at start, naming what.

Folders are the bundled all-MiniLM-L6-v2 with one thing changed (files linked, not copied); the
reference is sentence-transformers itself, on the same folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zembed.config import TextEngineConfig
from zembed.engines.stpipeline import UnsupportedPipeline, read_pipeline
from zembed.engines.text import TextModel, bundled_model_path

TEXTS = ["a cat sits on the mat", "stock markets fell sharply today", "red running shoes",
         " ".join(["searching documents about trail shoes"] * 12)]


def variant(tmp_path: Path, name: str) -> Path:
    """The bundled model's folder with every file linked, ready to have one thing changed."""
    folder = tmp_path / name
    shutil.copytree(bundled_model_path(), folder, copy_function=os.symlink)
    return folder


def rewrite(path: Path, data: object) -> None:
    path.unlink(missing_ok=True)  # a link to the bundled file: replace it, never write through
    path.write_text(json.dumps(data))


def test_the_bundled_model_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    model = TextModel(TextEngineConfig(threads=1, dtype="fp32"))
    assert model.describe()["pipeline"] == "Transformer → Pooling(mean) → Normalize (modules.json)"
    ours = model.encode(TEXTS)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)  # the engine's normalize=True
    ref = SentenceTransformer(str(bundled_model_path()), device="cpu").encode(TEXTS)
    assert ours.shape == ref.shape == (4, 384)
    cosine = np.sum(ours * ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() > 0.9999


def add_module(folder: Path, entry: dict[str, object], at: int | None = None) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(len(modules) if at is None else at, entry)
    rewrite(folder / "modules.json", modules)


def test_a_router_module_is_refused_by_name(tmp_path: Path) -> None:
    """A Router sends queries and documents through different modules: not run, so refused,
    at start, in one line, before anything is served."""
    folder = variant(tmp_path, "router")
    add_module(folder, {"idx": 2, "name": "2", "path": "2_Router",
                        "type": "sentence_transformers.base.modules.router.Router"})
    with pytest.raises(UnsupportedPipeline, match=r"module 2_Router \(sentence_transformers"):
        read_pipeline(folder)
    out = subprocess.run([sys.executable, "-m", "zembed", "start", "text", "--model", str(folder),
                          "--threads", "1", "--broker", "tcp://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "2_Router" in out.stderr and "Traceback" not in out.stderr


def test_a_class_outside_sentence_transformers_is_refused(tmp_path: Path) -> None:
    folder = variant(tmp_path, "custom")
    add_module(folder, {"idx": 3, "name": "3", "path": "3_Mine", "type": "my_package.MyModule"})
    with pytest.raises(UnsupportedPipeline, match=r"module 3_Mine \(my_package.MyModule\) is not"):
        read_pipeline(folder)


def test_a_pipeline_that_does_not_start_with_a_transformer_is_refused(tmp_path: Path) -> None:
    folder = variant(tmp_path, "static")
    rewrite(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "0_StaticEmbedding",
         "type": "sentence_transformers.sentence_transformer.modules.StaticEmbedding"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}])
    with pytest.raises(UnsupportedPipeline, match=r"0_StaticEmbedding.*comes first"):
        read_pipeline(folder)


@pytest.mark.parametrize(("data", "says"), [
    ({"max_seq_length": 256, "query_expansion": {"length": 32}}, "query_expansion"),
    ({"transformer_task": "text-generation"}, "transformer_task"),
    ({"model_kwargs": {"trust_remote_code": True}}, "model_kwargs trust_remote_code"),
    ({"my_new_setting": 1}, "setting 'my_new_setting'"),
])
def test_transformer_settings_zembed_does_not_apply_are_refused(
        tmp_path: Path, data: dict[str, object], says: str) -> None:
    folder = variant(tmp_path, "settings")
    rewrite(folder / "sentence_bert_config.json", data)
    with pytest.raises(UnsupportedPipeline, match=says):
        read_pipeline(folder)


def test_the_pipeline_is_described_as_declared(tmp_path: Path) -> None:
    folder = variant(tmp_path, "described")
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    rewrite(folder / "1_Pooling" / "config.json",
            {**config, "pooling_mode_cls_token": True, "include_prompt": False})
    rewrite(folder / "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": True})
    rewrite(folder / "config_sentence_transformers.json",
            {"prompts": {"query": "query: ", "passage": "passage: "},
             "default_prompt_name": "query"})
    pipe = read_pipeline(folder)
    assert pipe.description == ("Transformer → Pooling(cls+mean, prompt excluded) → Normalize "
                                "(modules.json)")
    assert pipe.normalize and not pipe.include_prompt and pipe.do_lower_case
    assert pipe.max_seq_length == 128 and pipe.default_prompt_name == "query"
    assert [s.kind for s in pipe.steps] == ["Pooling"]  # the last Normalize is the runtime's


def test_a_plain_checkpoint_says_it_is_mean_pooled(tmp_path: Path) -> None:
    folder = variant(tmp_path, "plain")
    (folder / "modules.json").unlink()
    shutil.rmtree(folder / "1_Pooling")
    model = TextModel(TextEngineConfig(model=str(folder), threads=1))
    assert model.describe()["pipeline"] == ("plain transformers checkpoint (no modules.json): "
                                            "mean pooling")
    assert model.encode(TEXTS[:1]).shape == (1, 384)


# -- the fingerprint covers every module; large files' digests are remembered ---------------


def test_every_module_file_enters_the_fingerprint(tmp_path: Path) -> None:
    """A retrained Dense head or a new prompt never meets an old cache entry; the model card's
    prose is not part of the function."""
    import stmodels as sm

    folder = sm.st_model(sm.encoder(tmp_path / "enc"), tmp_path / "dense", pooling="mean",
                         dense=16, prompts={"query": "query: "})

    def fingerprint() -> str:
        return TextModel(TextEngineConfig(model=str(folder), threads=1)).fingerprint("text")

    first = fingerprint()
    (folder / "README.md").write_text("# edited prose\n")
    assert fingerprint() == first
    dense = folder / "2_Dense" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(dense)
    save_file({k: v + 0.01 for k, v in weights.items()}, dense)
    retrained = fingerprint()
    assert retrained != first
    config = folder / "config_sentence_transformers.json"
    config.write_text(config.read_text().replace("query: ", "search query: "))
    assert fingerprint() not in (first, retrained)


def test_a_large_files_digest_is_remembered_beside_it(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from zembed.engines import filehash

    monkeypatch.setattr(filehash, "REMEMBER_FROM_BYTES", 1024)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    real = filehash.file_digest(weights)
    record = tmp_path / ".model.safetensors.zembed-hash"
    assert json.loads(record.read_text())["digest"] == real
    # The record is what a restart uses (no re-read): a planted digest comes back as long as
    # size and mtime match, and a rewritten file is hashed again.
    planted = json.loads(record.read_text()) | {"digest": "planted"}
    record.write_text(json.dumps(planted))
    assert filehash.file_digest(weights) == "planted"
    weights.write_bytes(os.urandom(4096))
    assert filehash.file_digest(weights) not in ("planted", real)


def test_a_read_only_model_folder_keeps_digests_in_the_user_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zembed.engines import filehash

    monkeypatch.setattr(filehash, "REMEMBER_FROM_BYTES", 1024)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(os.urandom(4096))
    (tmp_path / "model" / ".model.safetensors.zembed-hash").mkdir()  # not writable as a file
    digest = filehash.file_digest(weights)
    kept = list((tmp_path / "cache" / "zembed" / "hashes").glob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["digest"] == digest
    assert filehash.file_digest(weights) == digest


def test_a_model_card_that_declares_matryoshka_allows_dimensions(tmp_path: Path) -> None:
    """sentence-transformers writes the training loss into the card it saves: with
    MatryoshkaLoss there, ``--dimensions auto`` lets requests ask for a prefix."""
    folder = variant(tmp_path, "matryoshka")
    assert not read_pipeline(folder).matryoshka  # the bundled card: no such loss
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "README.md").write_text(
        "---\ntags:\n- sentence-transformers\n- loss:MatryoshkaLoss\n---\n"
        '```json\n{"loss": "MultipleNegativesRankingLoss", "matryoshka_dims": [384, 256, 128, 64],'
        ' "matryoshka_weights": [1, 1, 1, 1]}\n```\n')
    pipe = read_pipeline(folder)
    assert pipe.matryoshka and pipe.matryoshka_dims == (384, 256, 128, 64)
    model = TextModel(TextEngineConfig(model=str(folder), threads=1))
    assert model.describe()["dimensions"] is True
    assert model.describe()["matryoshka_dims"] == [384, 256, 128, 64]
    off = TextModel(TextEngineConfig(model=str(folder), threads=1, dimensions="off"))
    assert off.describe()["dimensions"] is False
    assert off.fingerprint("text") == model.fingerprint("text")  # same function either way


def test_the_operators_prefixes_override_the_models_prompts(tmp_path: Path) -> None:
    import stmodels as sm

    folder = sm.st_model(sm.encoder(tmp_path / "enc"), tmp_path / "prompts", pooling="mean",
                         prompts=sm.PROMPTS)
    model = TextModel(TextEngineConfig(model=str(folder), threads=1))
    tok = model.tokenizer
    assert model.prepare("text", ["x"], "query") == [tok("query: x")["input_ids"]]
    assert model.prepare("text", ["x"], "document") == [tok("passage: x")["input_ids"]]
    mine = TextModel(TextEngineConfig(model=str(folder), threads=1, query_prefix="find: ",
                                      document_prefix="doc: "))
    assert mine.prepare("text", ["x"], "query") == [tok("find: x")["input_ids"]]
    assert mine.prepare("text", ["x"], "document") == [tok("doc: x")["input_ids"]]
    assert mine.prepare("text", ["x"], "classification") == [
        tok("Classify the topic: x")["input_ids"]]
    unknown = mine.prepare("text", ["x", "y"], "summarize")
    assert [e.status for e in unknown] == [400, 400] and "summarize" in unknown[0].message
    assert mine.fingerprint("text") != model.fingerprint("text")


def _vocab() -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    return [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]


@pytest.mark.parametrize("shape", ["weighted-layers", "cnn", "word-weights"])
def test_other_pure_modules_match_sentence_transformers(tmp_path: Path, shape: str) -> None:
    """The rarer modules zembed runs (in-process: the broker path is tests/test_fidelity.py):
    WeightedLayerPooling over every layer, a CNN over the tokens, WordWeights from the vocab."""
    import stmodels as sm

    def tail(m: object) -> list[object]:
        mods: dict[str, list[object]] = {
            "weighted-layers": [m.WeightedLayerPooling(sm.HIDDEN, num_hidden_layers=2,  # type: ignore[attr-defined]
                                                       layer_start=1),
                                m.Pooling(sm.HIDDEN)],  # type: ignore[attr-defined]
            "cnn": [m.CNN(sm.HIDDEN, out_channels=8, kernel_sizes=[1, 3]),  # type: ignore[attr-defined]
                    m.Pooling(16, pooling_mode="max")],  # type: ignore[attr-defined]
            "word-weights": [m.WordWeights(_vocab(), {"shoes": 3.0, "trail": 0.5},  # type: ignore[attr-defined]
                                           unknown_word_weight=1.0),
                             m.Pooling(sm.HIDDEN)],  # type: ignore[attr-defined]
        }
        return mods[shape]

    folder = sm.st_pipeline(sm.encoder(tmp_path / "enc"), tmp_path / shape, tail,
                            hidden_states=shape == "weighted-layers")
    model = TextModel(TextEngineConfig(model=str(folder), threads=1, dtype="fp32"))
    if shape == "weighted-layers":  # else the module would pass the last layer through
        assert model.model.config.output_hidden_states is True
    ours = model.encode(sm.TEXTS)
    ref = sm.reference(folder, sm.TEXTS)
    assert ours.shape == ref.shape
    cosine = np.sum(ours * ref, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)

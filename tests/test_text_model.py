"""The text model follows the model's own sentence-transformers files, and says so in its fingerprint.

In-process tests of :class:`TextModel` on copies of the bundled all-MiniLM-L6-v2 directory
(real weights, real tokenizer), with one setting changed at a time.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from zembed.config import TextEngineConfig
from zembed.engines.sizing import Plan
from zembed.engines.stpipeline import UnsupportedPipeline
from zembed.engines.text import TextModel, bundled_model_path, resolve_model_dir

TEXTS = ["a cat sits on the mat", "stock markets fell sharply today"]


@pytest.fixture(scope="module")
def base() -> TextModel:
    return TextModel(TextEngineConfig(threads=1))


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(bundled_model_path(), target)
    return target


def test_bundled_defaults(base: TextModel) -> None:
    assert base.dim == 384 and base.pooling == "mean" and base.max_length == 256
    assert base.name == "sentence-transformers/all-MiniLM-L6-v2"
    out = base.encode(TEXTS)
    assert out.shape == (2, 384) and out.dtype == np.float32


def test_local_path_with_cls_pooling(base: TextModel, model_copy: Path, tmp_path: Path) -> None:
    cls_dir = tmp_path / "cls"
    shutil.copytree(model_copy, cls_dir)
    pool = cls_dir / "1_Pooling" / "config.json"
    cfg = json.loads(pool.read_text())
    cfg.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    pool.write_text(json.dumps(cfg))
    (cls_dir / "sentence_bert_config.json").write_text('{"max_seq_length": 8}')
    model = TextModel(TextEngineConfig(model=str(cls_dir), threads=1))
    assert model.pooling == "cls" and model.max_length == 8
    assert model.fingerprint("text") != base.fingerprint("text")
    cls_vec = model.encode(TEXTS)
    mean_vec = base.encode(TEXTS)
    assert not np.allclose(cls_vec, mean_vec, atol=1e-2)


def test_a_pooling_mode_sentence_transformers_lacks_is_refused_by_name(
        model_copy: Path, tmp_path: Path) -> None:
    folder = tmp_path / "median"
    shutil.copytree(model_copy, folder)
    (folder / "1_Pooling" / "config.json").write_text('{"embedding_dimension": 384, '
                                                      '"pooling_mode": "median"}')
    with pytest.raises(UnsupportedPipeline, match=r"module 1_Pooling \(Pooling\).*median"):
        TextModel(TextEngineConfig(model=str(folder), threads=1))


def test_prefixes_and_dtype_enter_the_fingerprint(base: TextModel) -> None:
    cfg = TextEngineConfig(threads=1)
    prefixed = TextModel(replace(cfg, query_prefix="query: "))
    # the other dtype than the one 'auto' chose on this CPU (bf16 needs native support to be auto)
    other = "fp32" if base.describe()["dtype"] == "bf16" else "bf16"
    fp32 = TextModel(replace(cfg, dtype=other))
    fps = {base.fingerprint("text"), prefixed.fingerprint("text"), fp32.fingerprint("text")}
    assert len(fps) == 3
    tok = prefixed.tokenizer
    assert prefixed.prepare("text", ["x"], "query") == [tok("query: x")["input_ids"]]
    assert prefixed.prepare("text", ["x"], None) == [tok("x")["input_ids"]]
    a, b = base.encode(TEXTS), fp32.encode(TEXTS)
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999  # bf16 compute stays faithful to fp32


def test_truncation_at_max_length(base: TextModel) -> None:
    long = "word " * 1000
    enc = base.tokenizer([long], truncation=True, max_length=base.max_length)
    assert len(enc["input_ids"][0]) == base.max_length
    assert [len(ids) for ids in base.prepare("text", [long, "short"], None)] == [256, 3]
    assert np.isfinite(base.encode([long])).all()


def test_unknown_hub_model_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a local directory"):
        resolve_model_dir("no-such-org/no-such-model-zembed")


def test_batch_invariant_is_announced_and_shares_the_fingerprint(base: TextModel) -> None:
    """Both modes compute the same function, only their padding (last bits) differs, so they
    share cache entries: the mode is in READY's facts, not in the fingerprint."""
    padded = TextModel(TextEngineConfig(threads=1, batch_invariant=False))
    assert base.describe()["batch_invariant"] is True
    assert padded.describe()["batch_invariant"] is False
    assert padded.fingerprint("text") == base.fingerprint("text")
    texts = [*TEXTS, "word " * 300]
    a, b = base.encode(texts), padded.encode(texts)
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9999


def test_warmup_measures_whether_batch_invariance_holds_here() -> None:
    """The check runs at warm-up only in the invariant mode, and READY's facts carry its answer."""
    model = TextModel(TextEngineConfig(threads=1, max_batch_tokens=4096))
    assert model.describe()["batch_invariant_holds"] is None  # not measured yet
    sizing, ready = model.warmup(Plan(max_batch=8, credits=16, threads=1))
    assert (sizing.max_batch, sizing.credits, sizing.auto) == (8, 16, [])  # fixed: kept
    assert sizing.max_batch_tokens == 4096 and ready["sizing"]["max_batch_tokens"] == 4096
    assert ready["sizing"]["curve"][-1][0] == 8 and ready["warmup_items_per_s"] > 0
    holds = model.describe()["batch_invariant_holds"]
    assert holds is model.check_batch_invariance(8) and holds in (True, False)
    padded = TextModel(TextEngineConfig(threads=1, batch_invariant=False))
    padded.warmup(Plan(max_batch=8, credits=16, threads=1))
    assert padded.describe()["batch_invariant_holds"] is None  # nothing promised, nothing checked


def test_a_model_transformers_cannot_load_is_one_line_at_start(tmp_path: Path) -> None:
    """A config naming an architecture transformers does not know (custom code, say) stops the
    engine with one line naming the folder, never a traceback."""
    import subprocess
    import sys

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "my-own-bert", "auto_map": {}}')
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="transformers could not load it"):
        TextModel(TextEngineConfig(model=str(folder), threads=1))
    out = subprocess.run([sys.executable, "-m", "zembed", "start", "text", "--model", str(folder),
                          "--threads", "1", "--broker", "tcp://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "transformers could not load it" in out.stderr and "Traceback" not in out.stderr

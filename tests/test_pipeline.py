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


def test_a_dense_head_is_refused_by_name(tmp_path: Path) -> None:
    folder = variant(tmp_path, "dense")
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                       "type": "sentence_transformers.models.Dense"})
    rewrite(folder / "modules.json", modules)
    with pytest.raises(UnsupportedPipeline, match=r"module 2_Dense \(sentence_transformers"):
        read_pipeline(folder)
    # From the command line: one line naming it, no traceback, before anything is served.
    out = subprocess.run([sys.executable, "-m", "zembed", "start", "text", "--model", str(folder),
                          "--threads", "1", "--broker", "tcp://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "2_Dense" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(("change", "says"), [
    ({"pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True}, "pooling_mode_lasttoken"),
    ({"pooling_mode_cls_token": True}, "pooling_mode_mean_tokens, pooling_mode_cls_token"),
    ({"include_prompt": False}, "include_prompt false"),
])
def test_pooling_zembed_does_not_compute_is_refused(tmp_path: Path, change: dict[str, object],
                                                    says: str) -> None:
    folder = variant(tmp_path, "pool")
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    rewrite(folder / "1_Pooling" / "config.json", {**config, **change})
    with pytest.raises(UnsupportedPipeline, match=says):
        read_pipeline(folder)


@pytest.mark.parametrize(("file", "data", "says"), [
    ("sentence_bert_config.json", {"max_seq_length": 256, "do_lower_case": True}, "do_lower_case"),
    ("config_sentence_transformers.json", {"prompts": {"query": "query: "},
                                           "default_prompt_name": "query"}, "default_prompt_name"),
])
def test_settings_that_change_the_vectors_are_refused(tmp_path: Path, file: str,
                                                      data: dict[str, object], says: str) -> None:
    folder = variant(tmp_path, "settings")
    rewrite(folder / file, data)
    with pytest.raises(UnsupportedPipeline, match=says):
        read_pipeline(folder)


def test_an_unknown_module_is_refused(tmp_path: Path) -> None:
    folder = variant(tmp_path, "custom")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Mine", "type": "my_package.MyModule"})
    rewrite(folder / "modules.json", modules)
    with pytest.raises(UnsupportedPipeline, match=r"module 3_Mine \(my_package.MyModule\)"):
        read_pipeline(folder)


def test_a_plain_checkpoint_says_it_is_mean_pooled(tmp_path: Path) -> None:
    folder = variant(tmp_path, "plain")
    (folder / "modules.json").unlink()
    shutil.rmtree(folder / "1_Pooling")
    model = TextModel(TextEngineConfig(model=str(folder), threads=1))
    assert model.describe()["pipeline"] == ("plain transformers checkpoint (no modules.json): "
                                            "mean pooling")
    assert model.encode(TEXTS[:1]).shape == (1, 384)

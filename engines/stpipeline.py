"""The sentence-transformers pipeline a model folder declares, checked against what zembed runs.

A search team picks a model and expects ``SentenceTransformer(model).encode(...)``'s vectors.
The text engine runs Transformer → Pooling → (Normalize) itself, with its own batching, so a
model whose ``modules.json`` asks for more (a Dense head, max or last-token pooling, a module
zembed does not know) would be served *different vectors without any error*: a Dense head
turned 128-dimensional vectors into 384-dimensional ones. Until the engine runs such modules,
it refuses the model at start, naming the module, instead of serving it wrong.

What is run faithfully: a Transformer module at the folder's root, Pooling with mean or CLS
tokens alone (prompt tokens included, the default), and Normalize. A folder without
``modules.json`` is a plain transformers checkpoint: mean pooling over the last hidden state, and
the engine says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ST = "sentence_transformers.models."
#: Pooling config keys zembed computes, and the mode each stands for.
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
#: Pooling modes sentence-transformers offers that zembed does not compute (yet).
OTHER_POOLING_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                       "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


class UnsupportedPipeline(ValueError):
    """The model's pipeline asks for something the engine would not compute as declared."""


@dataclass(frozen=True, slots=True)
class Pipeline:
    """What the engine runs for a model folder, and how READY and the log describe it."""

    pooling: str
    normalize_module: bool
    description: str


def read_pipeline(model_dir: Path) -> Pipeline:
    """The folder's pipeline, or :class:`UnsupportedPipeline` naming what cannot be run."""
    path = model_dir / "modules.json"
    if not path.exists():
        return _plain(model_dir)
    modules = _load(path)
    if not isinstance(modules, list) or not modules:
        raise UnsupportedPipeline(f"{path}: expected a list of modules")
    _check_text_settings(model_dir)
    pooling: str | None = None
    normalize, names = False, []
    for position, module in enumerate(modules):
        kind, where = _module(module, path)
        label = f"module {where or '(root)'} ({module['type']})"
        if kind == "Transformer" and position == 0 and where in ("", "."):
            names.append("Transformer")
        elif kind == "Pooling" and position == 1:
            pooling = _pooling(model_dir / where, label)
            names.append(f"Pooling({pooling})")
        elif kind == "Normalize" and pooling is not None and not normalize:
            normalize = True
            names.append("Normalize")
        else:
            raise UnsupportedPipeline(
                f"{model_dir}: {label} at position {position} is not run by zembed's text engine "
                "(it runs Transformer at the folder's root → Pooling → Normalize); serving the "
                "model without it would return vectors that differ from sentence-transformers'")
    if pooling is None:
        raise UnsupportedPipeline(f"{model_dir}: modules.json has no Pooling module after the "
                                  "Transformer")
    return Pipeline(pooling, normalize, " → ".join(names) + " (modules.json)")


def _plain(model_dir: Path) -> Pipeline:
    """A transformers checkpoint: mean pooling (CLS if a lone 1_Pooling config says so)."""
    pooling = "mean"
    if (model_dir / "1_Pooling" / "config.json").exists():
        pooling = _pooling(model_dir / "1_Pooling", "1_Pooling")
    return Pipeline(pooling, False,
                    f"plain transformers checkpoint (no modules.json): {pooling} pooling")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedPipeline(f"{path}: unreadable ({exc})") from None


def _module(module: Any, path: Path) -> tuple[str, str]:
    """(class name without the sentence-transformers prefix, folder) of one modules.json entry."""
    if not isinstance(module, dict) or not isinstance(module.get("type"), str):
        raise UnsupportedPipeline(f"{path}: a module entry without a type: {module!r:.100}")
    kind = module["type"]
    if kind.startswith("sentence_transformers."):  # models.X, or a newer release's longer path
        kind = kind.rsplit(".", 1)[-1]
    return kind, str(module.get("path", ""))


def _pooling(folder: Path, label: str) -> str:
    """The one pooling mode zembed computes that the config turns on, else refuse."""
    cfg = _load(folder / "config.json") if (folder / "config.json").exists() else {}
    if not isinstance(cfg, dict):
        raise UnsupportedPipeline(f"{folder}/config.json: expected an object")
    on = [key for key in (*POOLING_MODES, *OTHER_POOLING_MODES) if cfg.get(key)]
    if not on and "pooling_mode_mean_tokens" not in cfg:
        on = ["pooling_mode_mean_tokens"]  # sentence-transformers' default
    if len(on) != 1 or on[0] not in POOLING_MODES:
        raise UnsupportedPipeline(f"{label}: pooling {', '.join(on) or 'none'}; zembed computes "
                                  "mean or CLS pooling alone")
    if cfg.get("include_prompt") is False:
        raise UnsupportedPipeline(f"{label}: include_prompt false (prompt tokens left out of the "
                                  "pooling) is not run by zembed")
    return POOLING_MODES[on[0]]


def _check_text_settings(model_dir: Path) -> None:
    """Settings outside the modules that change the vectors: lower-casing, a default prompt."""
    bert = model_dir / "sentence_bert_config.json"
    if bert.exists() and isinstance(cfg := _load(bert), dict) and cfg.get("do_lower_case"):
        raise UnsupportedPipeline(f"{bert}: do_lower_case is not applied by zembed")
    st = model_dir / "config_sentence_transformers.json"
    if st.exists() and isinstance(cfg := _load(st), dict) and cfg.get("default_prompt_name"):
        raise UnsupportedPipeline(
            f"{st}: default_prompt_name {cfg['default_prompt_name']!r} is not applied by zembed "
            "yet (sentence-transformers prepends that prompt to every input)")

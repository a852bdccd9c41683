"""The sentence-transformers pipeline a model folder declares, read without running anything.

A search team picks a model and expects ``SentenceTransformer(model).encode(...)``'s vectors.
Before this module existed the engine read only ``1_Pooling/config.json``, and a model with a
Dense head came back 384-dimensional instead of 128, without any error. So the folder's
``modules.json`` is now the plan: the engine runs the Transformer itself (its own batching,
token budgets, threads and dtype) and every later module with sentence-transformers' own class
(:mod:`zembed.engines.stmodules`), in the declared order.

Only modules that are a pure function of the Transformer's output are run; anything else (a
Router, an input module after the Transformer, a class outside ``sentence_transformers``, a
Transformer setting zembed does not apply) stops the engine at start with a message naming it,
because serving without it would return vectors that differ from the reference.

A folder without ``modules.json`` is a plain transformers checkpoint: mean pooling over the last
hidden state, and READY and the log say so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: sentence-transformers module classes that map the Transformer's output to a vector without
#: looking at anything else (eval mode): these are run as declared.
#: (LSTM is left out: it needs per-text lengths that only a WordEmbeddings input module gives.)
PURE_MODULES = frozenset({"Pooling", "Dense", "Normalize", "LayerNorm", "WeightedLayerPooling",
                          "WordWeights", "CNN", "Dropout"})
#: Transformer settings (``sentence_bert_config.json``) zembed applies, or that cannot change a
#: text embedding; any other key with a non-default value is refused by name.
_APPLIED_SETTINGS = frozenset({"max_seq_length", "do_lower_case", "processor_kwargs",
                               "tokenizer_args", "config_kwargs", "config_args", "model_kwargs",
                               "model_args", "unpad_inputs", "backend"})
#: Settings that must hold these values (the text defaults) to be run faithfully.
_DEFAULT_SETTINGS: dict[str, tuple[Any, ...]] = {
    "transformer_task": (None, "feature-extraction"),
    "module_output_name": (None, "token_embeddings"),
    "modality_config": (None, {"text": {"method": "forward",
                                        "method_output_name": "last_hidden_state"}}),
    "processing_kwargs": (None, {}),
    "query_length": (None,),
    "document_length": (None,),
    "query_expansion": (None,),
}
#: ``model_kwargs`` keys that do not change the function computed (dtype is zembed's choice).
_HARMLESS_MODEL_KWARGS = frozenset({"torch_dtype", "dtype", "attn_implementation",
                                    "low_cpu_mem_usage", "device_map"})
#: Files whose bytes can shape a vector: configs, vocabularies, weights.
_SHAPING_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin", ".pt", ".pth", ".npy")
#: ``encode_document`` in sentence-transformers tries these prompt names, in this order.
DOCUMENT_PROMPTS = ("document", "passage", "corpus")


class UnsupportedPipeline(ValueError):
    """The model's pipeline asks for something the engine would not compute as declared."""


@dataclass(frozen=True, slots=True)
class Step:
    """One module after the Transformer: its sentence-transformers class name and folder.

    ``path`` is relative to the model folder ("" for the root); None means the module has no
    folder and is built from ``config`` (the mean pooling of a plain checkpoint).
    """

    kind: str
    path: str | None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pipeline:
    """What the engine runs for a model folder, and how READY and the log describe it."""

    transformer_dir: Path
    steps: tuple[Step, ...]
    #: The pipeline ends with Normalize: vectors are unit length whatever the request asks.
    #: That last Normalize is not among ``steps``, so a Matryoshka prefix is cut before it.
    normalize: bool
    description: str
    max_seq_length: int | None = None
    do_lower_case: bool = False
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    #: ``truncate_dim`` from config_sentence_transformers.json: the model's own output size.
    truncate_dim: int | None = None
    #: The model card says it was trained with MatryoshkaLoss; the dims it lists, if any.
    matryoshka: bool = False
    matryoshka_dims: tuple[int, ...] = ()
    files: tuple[Path, ...] = ()

    @property
    def pooling(self) -> str:
        """The pooling modes, as READY has always shown them ('mean', 'cls', 'max+mean', ...)."""
        return next((_modes(s) for s in self.steps if s.kind == "Pooling"), "none")

    @property
    def include_prompt(self) -> bool:
        """False when a Pooling module leaves the prompt's tokens out (INSTRUCTOR-style)."""
        return all(s.config.get("include_prompt", True) for s in self.steps if s.kind == "Pooling")


def read_pipeline(model_dir: Path) -> Pipeline:
    """The folder's pipeline, or :class:`UnsupportedPipeline` naming what cannot be run."""
    path = model_dir / "modules.json"
    if not path.exists():
        return _plain(model_dir)
    modules = _load(path)
    if not isinstance(modules, list) or not modules:
        raise UnsupportedPipeline(f"{path}: expected a list of modules")
    transformer: Path | None = None
    steps: list[Step] = []
    for position, module in enumerate(modules):
        kind, where = _module(module, path)
        label = f"module {where or '(root)'} ({module['type']})"
        if position == 0:
            if kind != "Transformer":
                raise UnsupportedPipeline(
                    f"{model_dir}: {label} comes first; zembed's text engine runs a Transformer "
                    "module first (static or bag-of-words models are not served)")
            transformer = _inside(model_dir, where, label)
        elif kind in PURE_MODULES:
            steps.append(Step(kind, where, _module_config(model_dir, where, kind, label)))
        else:
            raise UnsupportedPipeline(
                f"{model_dir}: {label} at position {position} is not run by zembed's text engine "
                f"(it runs a Transformer, then any of {', '.join(sorted(PURE_MODULES))}); "
                "serving the model without it would return vectors that differ from "
                "sentence-transformers'")
    assert transformer is not None
    normalize = bool(steps) and steps[-1].kind == "Normalize" and _plain_normalize(steps[-1])
    if normalize:
        steps.pop()
    if not steps:
        raise UnsupportedPipeline(f"{model_dir}: modules.json has nothing after the Transformer "
                                  "that makes one vector per text (no Pooling module)")
    settings = _transformer_settings(transformer)
    st_cfg = _st_config(model_dir)
    names = ["Transformer"] + [_step_name(s) for s in steps] + (["Normalize"] if normalize else [])
    dims = _matryoshka(model_dir)
    return Pipeline(
        transformer_dir=transformer, steps=tuple(steps), normalize=normalize,
        description=" → ".join(names) + " (modules.json)",
        max_seq_length=settings.get("max_seq_length"),
        do_lower_case=bool(settings.get("do_lower_case")),
        tokenizer_kwargs=dict(settings.get("processor_kwargs") or settings.get("tokenizer_args")
                              or {}),
        config_kwargs=dict(settings.get("config_kwargs") or settings.get("config_args") or {}),
        prompts=st_cfg["prompts"], default_prompt_name=st_cfg["default_prompt_name"],
        truncate_dim=st_cfg["truncate_dim"], matryoshka=dims is not None,
        matryoshka_dims=dims or (), files=_shaping_files(model_dir, modules))


def _plain(model_dir: Path) -> Pipeline:
    """A transformers checkpoint: mean pooling (or what a lone 1_Pooling config says)."""
    if (model_dir / "1_Pooling" / "config.json").exists():
        step = Step("Pooling", "1_Pooling",
                    _module_config(model_dir, "1_Pooling", "Pooling", "1_Pooling"))
    else:
        step = Step("Pooling", None, {"pooling_mode": "mean"})
    description = f"plain transformers checkpoint (no modules.json): {_modes(step)} pooling"
    return Pipeline(model_dir, (step,), False, description, files=_shaping_files(model_dir, []))


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedPipeline(f"{path}: unreadable ({exc})") from None


def _module(module: Any, path: Path) -> tuple[str, str]:
    """(class name, folder) of one modules.json entry; only sentence-transformers' own classes.

    A class outside the ``sentence_transformers`` namespace would run code the model's files
    choose (sentence-transformers itself wants trust_remote_code for it): refused.
    """
    if not isinstance(module, dict) or not isinstance(module.get("type"), str):
        raise UnsupportedPipeline(f"{path}: a module entry without a type: {module!r:.100}")
    kind, where = module["type"], str(module.get("path", ""))
    if not kind.startswith("sentence_transformers."):
        raise UnsupportedPipeline(
            f"{path.parent}: module {where or '(root)'} ({kind}) is not a sentence-transformers "
            "class; zembed does not run code named by a model's files")
    return kind.rsplit(".", 1)[-1], where


def _inside(model_dir: Path, where: str, label: str) -> Path:
    """A module folder, refusing paths that leave the model folder."""
    folder = (model_dir / where).resolve()
    if folder != model_dir.resolve() and model_dir.resolve() not in folder.parents:
        raise UnsupportedPipeline(f"{model_dir}: {label} points outside the model folder")
    return model_dir / where if where not in ("", ".") else model_dir


def _module_config(model_dir: Path, where: str, kind: str, label: str) -> dict[str, Any]:
    """A module's config.json (Pooling's legacy flags read as a mode list), for description."""
    cfg_path = _inside(model_dir, where, label) / "config.json"
    cfg = _load(cfg_path) if cfg_path.exists() and kind != "Transformer" else {}
    if not isinstance(cfg, dict):
        raise UnsupportedPipeline(f"{cfg_path}: expected an object")
    if kind == "Pooling" and "pooling_mode" not in cfg:
        legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                  "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean",
                  "pooling_mode_lasttoken": "lasttoken"}
        cfg = {**cfg, "pooling_mode": [m for k, m in legacy.items() if cfg.get(k)] or ["mean"]}
    return cfg


def _plain_normalize(step: Step) -> bool:
    """A Normalize of the sentence embedding (not of token embeddings, say)."""
    names = (step.config.get("module_input_name"), step.config.get("module_output_name"))
    return all(n in (None, "sentence_embedding") for n in names)


def _modes(step: Step) -> str:
    """A Pooling step's modes as READY shows them ('mean', 'cls+max+mean', ...)."""
    modes = step.config.get("pooling_mode", "mean")
    return "+".join(modes) if isinstance(modes, list | tuple) else str(modes)


def _step_name(step: Step) -> str:
    if step.kind == "Pooling":
        text = _modes(step)
        if step.config.get("include_prompt") is False:
            text += ", prompt excluded"
        return f"Pooling({text})"
    if step.kind == "Dense":
        return f"Dense({step.config.get('in_features')}→{step.config.get('out_features')})"
    return step.kind


def _transformer_settings(folder: Path) -> dict[str, Any]:
    """``sentence_bert_config.json``, refusing a setting zembed would not apply, by name."""
    path = folder / "sentence_bert_config.json"
    cfg = _load(path) if path.exists() else {}
    if not isinstance(cfg, dict):
        raise UnsupportedPipeline(f"{path}: expected an object")
    for key, value in cfg.items():
        allowed = _DEFAULT_SETTINGS.get(key)
        if allowed is not None and value not in allowed:
            raise UnsupportedPipeline(f"{path}: {key} = {json.dumps(value)[:80]} is not applied "
                                      "by zembed's text engine")
        if allowed is None and key not in _APPLIED_SETTINGS:
            raise UnsupportedPipeline(f"{path}: setting {key!r} is not applied by zembed's text "
                                      "engine")
    model_kwargs = cfg.get("model_kwargs") or cfg.get("model_args") or {}
    if isinstance(model_kwargs, dict) and (odd := set(model_kwargs) - _HARMLESS_MODEL_KWARGS):
        raise UnsupportedPipeline(f"{path}: model_kwargs {', '.join(sorted(odd))} are not applied "
                                  "by zembed's text engine")
    if cfg.get("backend", "torch") != "torch":
        raise UnsupportedPipeline(f"{path}: backend {cfg['backend']!r}; zembed runs torch")
    return cfg


def _st_config(model_dir: Path) -> dict[str, Any]:
    """Prompts, the default prompt and truncate_dim from config_sentence_transformers.json."""
    path = model_dir / "config_sentence_transformers.json"
    cfg = _load(path) if path.exists() else {}
    if not isinstance(cfg, dict):
        raise UnsupportedPipeline(f"{path}: expected an object")
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise UnsupportedPipeline(f"{path}: prompts must map names to strings")
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise UnsupportedPipeline(f"{path}: default_prompt_name {default!r} is not among the "
                                  "prompts")
    truncate = cfg.get("truncate_dim")
    if truncate is not None and (not isinstance(truncate, int) or truncate <= 0):
        raise UnsupportedPipeline(f"{path}: truncate_dim must be a positive integer")
    return {"prompts": dict(prompts), "default_prompt_name": default, "truncate_dim": truncate}


def _matryoshka(model_dir: Path) -> tuple[int, ...] | None:
    """The model card's word that it was trained for truncation (MatryoshkaLoss), and its dims.

    sentence-transformers writes the training loss into the card it saves (``loss:MatryoshkaLoss``
    among the tags, the loss settings with ``matryoshka_dims`` below): that is the declaration.
    """
    card = model_dir / "README.md"
    try:
        text = card.read_text(errors="replace")[:500_000]
    except OSError:
        return None
    if "matryoshka" not in text.lower():
        return None
    found = re.search(r'"matryoshka_dims"\s*:\s*\[([\d,\s]+)\]', text)
    if not found:
        return ()
    return tuple(sorted({int(d) for d in found.group(1).split(",") if d.strip()}, reverse=True))


def _shaping_files(model_dir: Path, modules: list[Any]) -> tuple[Path, ...]:
    """Every file of the model and its module folders whose bytes can change a vector.

    The fingerprint hashes these, so a retrained Dense head, a new prompt or tokenizer never
    meets an old cache entry. The model card (README.md) is left out: editing prose changes
    nothing.
    """
    folders = {model_dir}
    for module in modules:
        if isinstance(module, dict) and module.get("path"):
            folders.add(model_dir / str(module["path"]))
    files: set[Path] = set()
    for folder in folders:
        if folder.is_dir():
            files.update(f for f in folder.iterdir()
                         if f.is_file() and f.name.endswith(_SHAPING_SUFFIXES)
                         and not f.name.startswith("."))
    return tuple(sorted(files))

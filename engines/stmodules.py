"""The modules after the Transformer, run with sentence-transformers' own classes.

sentence-transformers is the field's reference implementation of pooling, Dense heads and the
rest; running its classes on the Transformer's output (rather than re-writing each mode) is
what keeps zembed's vectors the ones a model's authors get, for every mode the installed
version offers. The Transformer itself stays zembed's: its batching, length buckets, token
budgets, threads and dtype. These modules run in float32 on the engine's device; they cost a
small fraction of the Transformer pass.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from zembed.engines.stpipeline import Pipeline, Step, UnsupportedPipeline


def _module_classes() -> Any:
    """sentence-transformers' module namespace (6.x layout, else the older ``models``)."""
    import importlib

    try:
        return importlib.import_module("sentence_transformers.sentence_transformer.modules")
    except ImportError:
        return importlib.import_module("sentence_transformers.models")


class PostModules:
    """Pooling → ... as ``modules.json`` lists them, on zembed's own Transformer output.

    :param pipeline: what the folder declares (:func:`read_pipeline`).
    :param model_dir: the model folder, which module paths are relative to.
    :param hidden_size: the Transformer's output width (a plain checkpoint's pooling needs it).
    """

    def __init__(self, pipeline: Pipeline, model_dir: Path, hidden_size: int,
                 device: torch.device) -> None:
        classes = _module_classes()
        self.modules: list[torch.nn.Module] = []
        for step in pipeline.steps:
            cls = getattr(classes, step.kind, None)
            if cls is None:
                raise UnsupportedPipeline(f"{model_dir}: module {step.path} ({step.kind}) is not "
                                          "in the installed sentence-transformers")
            try:
                module = self._load(cls, step, model_dir, hidden_size)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise UnsupportedPipeline(f"{model_dir}: module {step.path or '(built)'} "
                                          f"({step.kind}) does not load: {exc}") from None
            self.modules.append(module.to(device=device, dtype=torch.float32).eval())
        self.prompt_aware = not pipeline.include_prompt

    @staticmethod
    def _load(cls: Any, step: Step, model_dir: Path, hidden_size: int) -> torch.nn.Module:
        if step.path is None:  # a plain checkpoint's pooling: built, not loaded
            module: torch.nn.Module = cls(hidden_size, **step.config)
            return module
        if len(inspect.signature(cls.load).parameters) == 1:  # pre-5.0 modules: load(folder)
            module = cls.load(str(model_dir / step.path))
        else:
            module = cls.load(str(model_dir), subfolder=step.path, local_files_only=True)
        return module

    @torch.inference_mode()
    def __call__(self, features: dict[str, Any],
                 prompt_lengths: list[int] | None = None) -> torch.Tensor:
        """The sentence embeddings of one pass (float32, one row per input).

        ``prompt_lengths`` (one per row) matter only to a Pooling that leaves the prompt out:
        sentence-transformers takes one prompt length per batch, so rows with different
        prompts (a query and a document in one pass) are pooled in groups.
        """
        if not self.prompt_aware or not prompt_lengths or not any(prompt_lengths):
            return self._run(features)
        groups: dict[int, list[int]] = {}
        for row, length in enumerate(prompt_lengths):
            groups.setdefault(length, []).append(row)
        out: torch.Tensor | None = None
        for length, rows in groups.items():
            index = torch.tensor(rows, device=features["token_embeddings"].device)
            part = {k: _rows(v, index) for k, v in features.items()}
            if length:
                part["prompt_length"] = length
            vectors = self._run(part)
            if out is None:
                out = vectors.new_empty((len(prompt_lengths), vectors.shape[1]))
            out[index] = vectors
        assert out is not None
        return out

    def _run(self, features: dict[str, Any]) -> torch.Tensor:
        for module in self.modules:
            features = module(features)
        if "sentence_embedding" not in features:
            raise UnsupportedPipeline("the modules after the Transformer made no "
                                      "sentence_embedding")
        result: torch.Tensor = features["sentence_embedding"]
        return result


def _rows(value: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of a batch feature (tensors, or lists of per-layer tensors)."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    if isinstance(value, list | tuple):
        return [v.index_select(0, index) for v in value]
    return value

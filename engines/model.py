"""The interface every embedding model implements, so one runtime serves text and images.

Infinity's pre / core / post split, reduced to what the runtime needs: ``prepare`` turns wire
items into model inputs (cheap, per item), ``forward`` embeds a batch of prepared inputs of one
kind, and the runtime does the rest (batching, normalisation, BF16 rounding, replies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class ItemError:
    """``prepare``'s answer for an item that cannot be embedded; it fails alone."""

    status: int
    message: str


class EmbeddingModel(Protocol):
    """What the engine runtime needs from a model."""

    #: Lane the engine registers for, and the kinds of input it embeds.
    lane: str
    kinds: frozenset[str]
    #: Output dimension.
    dim: int
    #: Threads for ``prepare`` (decoding) so it overlaps the forward pass; 0 = run it inline.
    prepare_workers: int
    #: The model's own pipeline ends with a normalisation: vectors are unit length even when a
    #: request asks for raw ones (the runtime applies it, after any Matryoshka cut).
    normalizes: bool

    def fingerprint(self, kind: str) -> str:
        """Stable id of everything that shapes the vectors of ``kind`` (model, weights, ...)."""
        ...

    def describe(self) -> dict[str, Any]:
        """msgpack-able facts for READY and stats (model name, device, dtype, ...)."""
        ...

    def prepare(self, kind: str, items: list[Any], input_type: str | None) -> list[Any]:
        """Turn wire items into inputs for :meth:`forward` (prefixes, decoding).

        Returns one entry per item, an :class:`ItemError` for an item that cannot be used.
        May run on a pool thread, concurrently with :meth:`forward`.
        """
        ...

    def cost(self, prepared: Any) -> int:
        """A size estimate of one prepared input, used to sort a batch and cut padding."""
        ...

    def forward(self, kind: str, inputs: list[Any]) -> npt.NDArray[np.float32]:
        """Embed a batch of prepared inputs: float32 ``(len(inputs), dim)``, not normalised."""
        ...

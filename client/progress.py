"""Progress and item-error reporting of a bulk run, and gathering its chunks into one array.

The progress bar is tqdm's, when tqdm is installed (``pip install 'zembed[progress]'``); a
service that logs its own progress passes a callback instead. Failed items never stop a run:
they go to ``on_item_error``, or to the ``zembed.client`` logger when no callback was given.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from zembed.client.bulk import EmbedChunk
from zembed.client.codec import Vectors

log = logging.getLogger("zembed.client")

#: Called with (inputs done, inputs in all or None when the input has no length).
ProgressCallback = Callable[[int, "int | None"], None]
#: Called with (input index, status, message) for each input that failed.
ItemErrorCallback = Callable[[int, int, str], None]
#: Failed items logged one by one, before only a count is logged at the end.
LOGGED_ERRORS = 10


class BulkReport:
    """Counts a run's chunks for a progress bar, a callback and the item-error report."""

    def __init__(self, total: int | None, *, progress: bool = False,
                 on_progress: ProgressCallback | None = None,
                 on_item_error: ItemErrorCallback | None = None, desc: str = "embedding") -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.on_progress = on_progress
        self.on_item_error = on_item_error
        self._bar = _tqdm(total, desc) if progress else None

    def chunk(self, chunk: EmbedChunk) -> None:
        """Account one chunk handed back to the caller."""
        n = len(chunk.vectors)
        self.done += n
        for index, (status, message) in sorted(chunk.item_errors.items()):
            self.failed += 1
            if self.on_item_error is not None:
                self.on_item_error(index, status, message)
            elif self.failed <= LOGGED_ERRORS:
                log.warning("input %d failed (%d): %s; its row is zeros", index, status, message)
        if self._bar is not None:
            self._bar.update(n)
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def each(self, chunks: Iterable[EmbedChunk]) -> Iterator[EmbedChunk]:
        """``chunks``, each accounted as it passes."""
        for chunk in chunks:
            self.chunk(chunk)
            yield chunk

    def close(self) -> None:
        """Close the bar; say how many inputs failed beyond those logged one by one."""
        if self._bar is not None:
            self._bar.close()
        if self.on_item_error is None and self.failed > LOGGED_ERRORS:
            log.warning("%d inputs failed in all (the first %d logged above)", self.failed,
                        LOGGED_ERRORS)


def _tqdm(total: int | None, desc: str) -> Any:
    try:  # optional, and untyped: looked up by name
        tqdm = importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        raise ImportError("progress=True needs tqdm: pip install 'zembed[progress]' "
                          "(or pass on_progress= a callback)") from None
    return tqdm(total=total, desc=desc, unit="item", smoothing=0.1)


class Assembler:
    """One ``(n, dim)`` array from in-order chunks, filled in place when ``n`` is known."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self._out: Vectors | None = None
        self._parts: list[Vectors] = []

    def add(self, chunk: EmbedChunk) -> None:
        """Place one chunk's rows."""
        if self.total is None:
            self._parts.append(chunk.vectors)
            return
        if self._out is None:
            self._out = np.empty((self.total, chunk.vectors.shape[1]), chunk.vectors.dtype)
        self._out[chunk.offset:chunk.offset + len(chunk.vectors)] = chunk.vectors

    def array(self) -> Vectors:
        """Every row so far (all of them once the run is over)."""
        if self._out is not None:
            return self._out
        return np.concatenate(self._parts) if self._parts else np.zeros((0, 0), np.float32)


def gather(chunks: Iterable[EmbedChunk], total: int | None) -> Vectors:
    """:class:`Assembler` over an iterable of chunks."""
    out = Assembler(total)
    for chunk in chunks:
        out.add(chunk)
    return out.array()

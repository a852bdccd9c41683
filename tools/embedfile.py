"""``zembed embed text|image|clip-text --file F [--out vectors.npy]``: a corpus through embed_many.

Row ``i`` of the output is line ``i + 1`` of the file (every line is an input, blank ones
too, so rows and lines stay aligned). The output file is written as the vectors arrive, in a
memory-mapped ``.npy``, so a file larger than memory can be embedded. Failed inputs (an
unreadable image, say) get zero rows and one line each on stderr; the summary says how many.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from zembed.client.bulk import EmbedChunk
from zembed.client.codec import Vectors
from zembed.client.progress import BulkReport


def read_lines(path: Path) -> Iterator[str]:
    """Every line of ``path`` without its line break, read lazily."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            yield line.rstrip("\r\n")


def count_lines(path: Path) -> int:
    """Lines in ``path`` (a last line without a line break counts), without decoding them."""
    n, last = 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


class NpyWriter:
    """Rows into a ``.npy`` of known length, memory-mapped, created at the first chunk."""

    def __init__(self, path: Path, rows: int) -> None:
        self.path = path
        self.rows = rows
        self._out: Vectors | None = None

    def add(self, chunk: EmbedChunk) -> None:
        if self._out is None:
            self._out = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=chunk.vectors.dtype,
                shape=(self.rows, chunk.vectors.shape[1]))
        self._out[chunk.offset:chunk.offset + len(chunk.vectors)] = chunk.vectors

    def close(self) -> None:
        if self._out is None:  # no rows at all
            np.save(self.path, np.zeros((0, 0), np.float32))
            return
        self._out.flush()  # type: ignore[attr-defined]
        del self._out


def print_rows(chunk: EmbedChunk, labels: list[str], as_json: bool, echo: Callable[[str], Any],
               ) -> None:
    """One line (or JSON object) per input of ``chunk``, as ``zembed embed`` prints them."""
    for i, vec in enumerate(chunk.vectors):
        index = chunk.offset + i
        error = chunk.item_errors.get(index)
        label = labels[i]
        if as_json:
            row: dict[str, Any] = {"input": label, "dim": len(vec)}
            row.update({"error": list(error)} if error else {"vector": vec.tolist()})
            echo(json.dumps(row))
        elif error:
            echo(f"{label}\terror {error[0]}: {error[1]}")
        else:
            echo(f"{label}\t" + " ".join(f"{x:.6g}" for x in vec))


def embed_file(client: Any, path: Path, kind: str, *, out: Path | None, normalize: bool,
               input_type: str | None = None, dimensions: int | None = None,
               batch_size: int | None, progress: bool,
               as_json: bool, echo: Callable[[str], Any], err: TextIO = sys.stderr,
               ) -> dict[str, Any]:
    """Embed every line of ``path``; write ``out`` or print the rows. Returns the summary."""
    total = count_lines(path)

    def item_error(index: int, status: int, message: str) -> None:
        print(f"input {index} (line {index + 1}) failed: {status} {message}", file=err)

    report = BulkReport(total, progress=progress, on_item_error=item_error,
                        desc=f"embedding {path.name}")
    writer = NpyWriter(out, total) if out is not None else None
    lines: list[str] = []
    source = read_lines(path)
    labelled = _remember(source, lines) if writer is None else source
    t0 = time.perf_counter()
    cached = 0
    try:
        for chunk in client.embed_many_iter(labelled, kind, normalize=normalize,
                                            input_type=input_type, dimensions=dimensions,
                                            batch_size=batch_size):
            report.chunk(chunk)
            cached += len(chunk.cached_items)
            if writer is not None:
                writer.add(chunk)
            else:
                print_rows(chunk, lines[:len(chunk.vectors)], as_json, echo)
                del lines[:len(chunk.vectors)]
    finally:
        report.close()
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    return {"items": report.done, "failed": report.failed, "cached": cached,
            "seconds": round(seconds, 3),
            "items_per_s": round(report.done / seconds, 1) if seconds > 0 else None,
            "out": str(out) if out is not None else None}


def _remember(source: Iterator[str], seen: list[str]) -> Iterator[str]:
    """``source``, keeping each line until its row is printed."""
    for line in source:
        seen.append(line)
        yield line

"""One batch of jobs in, one outcome per job out: prepare, forward, post-process.

Free of sockets and threads, so the engine runtime stays about I/O and this stays about
numbers. Items that cannot be embedded (a corrupt image) come back from ``prepare`` as
:class:`ItemError`; they fail alone, with a zero row and an entry in ``item_errors``, and the
rest of the request gets its vectors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from zembed import protocol as p
from zembed.cache.bf16 import to_bf16
from zembed.engines.batching import Job
from zembed.engines.model import EmbeddingModel, ItemError

log = logging.getLogger("zembed.engine")


@dataclass(slots=True)
class Outcome:
    """What to reply for one job."""

    job: Job
    status: int
    body: bytes = b""
    n: int = 0
    dim: int = 0
    error: str | None = None
    item_errors: list[list[Any]] | None = None


def postprocess(vectors: npt.NDArray[np.float32], normalize: bool,
                dimensions: int | None = None) -> bytes:
    """Cut to a Matryoshka prefix, normalise in fp32 when asked, round once to BF16.

    The prefix is cut *before* normalising (as OpenAI's ``dimensions`` and sentence-transformers'
    ``truncate_dim`` with normalisation do), so a normalised prefix is unit length again.
    """
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.float32(1e-12))
    return to_bf16(np.ascontiguousarray(vectors, dtype=np.float32)).astype(
        "<u2", copy=False).tobytes()


def chunks(costs: list[int], max_batch: int, max_cost: int) -> list[slice]:
    """Cut inputs sorted by ascending cost into forward passes.

    A chunk holds at most ``max_batch`` inputs and, when ``max_cost`` > 0, at most
    ``max_cost`` padded units (inputs x the costliest one, i.e. tokens after padding); an input
    over the budget on its own still gets a pass of its own.
    """
    out: list[slice] = []
    lo = 0
    for hi in range(1, len(costs) + 1):
        size = hi - lo
        if size > max_batch or (max_cost > 0 and size > 1 and size * costs[hi - 1] > max_cost):
            out.append(slice(lo, hi - 1))
            lo = hi - 1
    if lo < len(costs):
        out.append(slice(lo, len(costs)))
    return out


class BatchRunner:
    """Runs batches of one kind through a model, cut into forward passes by count and cost.

    :param max_batch: most inputs in one forward pass.
    :param max_tokens: most padded cost units (tokens for text) in one pass; 0 = no limit.
    """

    def __init__(self, model: EmbeddingModel, max_batch: int, max_tokens: int = 0) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.batches = 0
        self.items = 0

    def run(self, batch: list[Job], now: float, *, pass_items: int = 0,
            between: Callable[[], None] | None = None) -> list[Outcome]:
        """Outcomes for every job: 504 if expired, 500 if the model failed, else vectors.

        ``pass_items``: most inputs per forward pass for this batch (0: ``max_batch``).
        ``between``: called between two passes of this batch (the runtime runs waiting
        queries there, so a query waits for one short pass rather than a whole bulk batch).
        """
        outcomes = [Outcome(j, p.DEADLINE_EXCEEDED, error="deadline passed")
                    for j in batch if j.deadline <= now]
        live = [j for j in batch if j.deadline > now]
        if not live:
            return outcomes
        try:
            prepared = [self._prepared(job) for job in live]
            vectors = self._forward(live[0].kind, prepared, pass_items or self.max_batch,
                                    between)
        except Exception as exc:  # a model failure fails this batch, never the engine
            log.exception("batch of %d job(s) failed", len(live))
            return outcomes + [Outcome(j, p.ENGINE_ERROR, error=f"engine error: {exc}")
                               for j in live]
        self.batches += 1
        self.items += len(vectors)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch of %d job(s), %d item(s) in %.1f ms", len(live), len(vectors),
                      (time.monotonic() - now) * 1000)
        start = 0
        for job, inputs in zip(live, prepared, strict=True):
            end = start + len(inputs)
            errors = [[i, x.status, x.message] for i, x in enumerate(inputs)
                      if isinstance(x, ItemError)]
            # A pipeline that ends with Normalize gives unit vectors whatever the request says.
            normalize = job.normalize or self.model.normalizes
            dim = min(job.dimensions or self.model.dim, self.model.dim)
            outcomes.append(Outcome(job, p.OK,
                                    postprocess(vectors[start:end], normalize, dim),
                                    len(inputs), dim, item_errors=errors or None))
            start = end
        return outcomes

    def _prepared(self, job: Job) -> list[Any]:
        """The job's prepared inputs: from the decode pool if it ran there, else now."""
        if job.prepared is not None:
            return job.prepared.result()
        return self.model.prepare(job.kind, job.items, job.input_type)

    def _forward(self, kind: str, prepared: list[list[Any]], max_batch: int,
                 between: Callable[[], None] | None = None) -> npt.NDArray[np.float32]:
        """All good inputs, sorted by cost to cut padding, in passes of bounded size and cost
        (``between`` runs before every pass but the first)."""
        inputs = [x for job_inputs in prepared for x in job_inputs]
        out = np.zeros((len(inputs), self.model.dim), dtype=np.float32)
        cost = self.model.cost
        good = sorted((i for i, x in enumerate(inputs) if not isinstance(x, ItemError)),
                      key=lambda i: cost(inputs[i]))
        for n, part in enumerate(chunks([cost(inputs[i]) for i in good], max_batch,
                                        self.max_tokens)):
            if n and between is not None:
                between()
            idx = good[part]
            out[idx] = self.model.forward(kind, [inputs[i] for i in idx])
        return out

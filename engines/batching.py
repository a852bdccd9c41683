"""The engine's job queue and batch formation (dynamic batching), free of sockets and torch.

The socket thread puts jobs in as they arrive; the inference thread takes a batch whenever the
model is free: every queued job in arrival order up to ``max_items`` items (a job bigger than
that forms a batch of its own), interactive jobs first. There is no fixed delay by default:
while the model runs, new jobs queue up, so batches grow exactly as load grows and a lone
request is never held back.

Two classes: a search query waits behind at most the forward pass in progress, never behind
the bulk jobs queued before it. A batch is all interactive jobs while any are queued, and all
bulk jobs otherwise: filling a query's batch with bulk work would make the query wait for a
full batch (measured beside a bulk flood: 62-70 ms at p50 that way, 25-28 ms in passes of
their own, 13 ms on an idle lane), while a pass of queries alone is short. Bulk jobs wait
only while queries keep the model busy, and the broker keeps some credits from bulk work, so
that never lasts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Job:
    """One REQUEST from the broker, as the inference thread needs it."""

    token: int
    kind: str
    normalize: bool
    input_type: str | None
    items: list[Any]
    deadline: float  # time.monotonic() after which the broker has given up on it
    generation: int  # connection generation; replies of an older one are dropped
    prepared: Future[list[Any]] | None = None  # decoding started in the pool on arrival
    dimensions: int | None = None  # a Matryoshka prefix of this many values, cut before normalising
    bulk: bool = False  # priority bulk: after every interactive job


class JobQueue:
    """Two FIFOs of jobs (interactive, bulk) with batch-shaped takes. Thread-safe."""

    def __init__(self) -> None:
        self._interactive: deque[Job] = deque()
        self._bulk: deque[Job] = deque()
        self._cond = threading.Condition()
        #: When the last interactive job arrived (time.monotonic()); -inf: never.
        self.last_interactive = float("-inf")

    def __len__(self) -> int:
        return len(self._interactive) + len(self._bulk)

    def put(self, job: Job) -> None:
        """Queue a job and wake the inference thread."""
        with self._cond:
            if job.bulk:
                self._bulk.append(job)
            else:
                self._interactive.append(job)
                self.last_interactive = time.monotonic()
            self._cond.notify()

    def take_batch(self, max_items: int, timeout_s: float, max_wait_s: float = 0.0) -> list[Job]:
        """Jobs of one kind and one class, interactive ones while any are queued, in arrival
        order, up to ``max_items`` items ([] after ``timeout_s``).

        With ``max_wait_s`` > 0, a batch that is not full waits that long for more jobs.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._interactive or self._bulk),
                                       timeout_s):
                return []
            if max_wait_s > 0:
                fill_by = time.monotonic() + max_wait_s
                while self._queued_items() < max_items:
                    left = fill_by - time.monotonic()
                    if left <= 0 or not self._cond.wait(left):
                        break
            return _pop(self._interactive or self._bulk, max_items)

    def take_interactive(self, max_items: int) -> list[Job]:
        """Interactive jobs of one kind, up to ``max_items`` items, at once ([] if none):
        what the inference thread runs between the passes of a bulk batch."""
        with self._cond:
            return _pop(self._interactive, max_items) if self._interactive else []

    def queries_within(self, seconds: float) -> bool:
        """Whether an interactive job arrived in the last ``seconds``."""
        return time.monotonic() - self.last_interactive < seconds

    def _queued_items(self) -> int:
        return sum(len(j.items) for q in (self._interactive, self._bulk) for j in q)

    def drop_generation(self, generation: int) -> int:
        """Forget the jobs of one broker connection that was lost (its broker is gone or
        answered them 503); return how many."""
        with self._cond:
            dropped = 0
            for queue in (self._interactive, self._bulk):
                keep = [j for j in queue if j.generation != generation]
                dropped += len(queue) - len(keep)
                queue.clear()
                queue.extend(keep)
            return dropped


def _pop(queue: deque[Job], max_items: int) -> list[Job]:
    """The first job of a non-empty ``queue`` and the ones after it of the same kind, in
    order, while they fit ``max_items`` items (a bigger first job goes alone)."""
    first = queue.popleft()
    batch = [first]
    items, kind = len(first.items), first.kind
    while queue and queue[0].kind == kind:
        if items + len(queue[0].items) > max_items:
            break
        job = queue.popleft()
        items += len(job.items)
        batch.append(job)
    return batch

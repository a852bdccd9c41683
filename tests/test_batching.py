"""Batch formation: FIFO, one kind per batch, bounded by items, old connections dropped."""

from __future__ import annotations

import threading
import time
from typing import Any

from zembed.engines.batching import Job, JobQueue


def job(tok: int, n: int, kind: str = "text", gen: int = 1) -> Job:
    return Job(tok, kind, True, None, ["x"] * n, time.monotonic() + 10, gen)


def test_takes_whole_jobs_up_to_max_items() -> None:
    q = JobQueue()
    for tok, n in enumerate([3, 4, 2, 5]):
        q.put(job(tok, n))
    assert [j.token for j in q.take_batch(9, 0.1)] == [0, 1, 2]
    assert [j.token for j in q.take_batch(9, 0.1)] == [3]


def test_big_job_forms_its_own_batch() -> None:
    q = JobQueue()
    q.put(job(1, 50))
    q.put(job(2, 1))
    assert [j.token for j in q.take_batch(32, 0.1)] == [1]


def test_kinds_never_mix() -> None:
    q = JobQueue()
    q.put(job(1, 1, "image"))
    q.put(job(2, 1, "clip-text"))
    assert [j.token for j in q.take_batch(32, 0.1)] == [1]


def test_empty_queue_times_out() -> None:
    t0 = time.monotonic()
    assert JobQueue().take_batch(32, 0.05) == []
    assert time.monotonic() - t0 < 1.0


def test_max_wait_gathers_late_jobs() -> None:
    q = JobQueue()
    q.put(job(1, 1))
    threading.Timer(0.02, lambda: q.put(job(2, 1))).start()
    assert [j.token for j in q.take_batch(32, 0.1, max_wait_s=0.5)] == [1, 2]


def test_drop_the_generation_of_a_lost_connection_only() -> None:
    q = JobQueue()
    q.put(job(1, 1, gen=1))
    q.put(job(2, 1, gen=2))
    q.put(job(3, 1, gen=3))  # another broker's connection, older or newer: kept
    assert q.drop_generation(2) == 1
    assert [j.token for j in q.take_batch(32, 0.1)] == [1, 3]


def test_chunks_respect_count_and_token_budget() -> None:
    from zembed.engines.compute import chunks

    costs = [5, 5, 6, 10, 10, 40, 300]  # sorted ascending, as the runner sorts them
    parts = chunks(costs, max_batch=4, max_cost=64)
    sizes = [(c.stop - c.start) for c in parts]
    assert sum(sizes) == len(costs) and all(s <= 4 for s in sizes)
    for c in parts:  # padded tokens within budget, unless one item is over it on its own
        assert (c.stop - c.start) * max(costs[c]) <= 64 or c.stop - c.start == 1
    assert [costs[c] for c in parts] == [[5, 5, 6, 10], [10], [40], [300]]
    assert chunks(costs, max_batch=32, max_cost=0) == [slice(0, 7)]  # no budget: count only
    assert chunks([], 32, 64) == []


def test_interactive_jobs_go_first_in_batches_of_their_own() -> None:
    q = JobQueue()
    for tok, n in ((1, 8), (2, 8), (3, 8)):
        bulk = job(tok, n)
        bulk.bulk = True
        q.put(bulk)
    q.put(job(10, 1))  # a query that arrived after the bulk jobs
    q.put(job(11, 1))
    assert [j.token for j in q.take_batch(12, 0.1)] == [10, 11]  # the queries, alone
    assert [j.token for j in q.take_batch(12, 0.1)] == [1]
    assert [j.token for j in q.take_batch(12, 0.1)] == [2]
    q.put(job(12, 1, gen=0))
    assert q.drop_generation(0) == 1 and len(q) == 1
    assert [j.token for j in q.take_batch(12, 0.1)] == [3]


def test_take_interactive_and_recent_queries() -> None:
    q = JobQueue()
    assert not q.queries_within(1.0) and q.take_interactive(8) == []
    bulk = job(1, 8)
    bulk.bulk = True
    q.put(bulk)
    assert not q.queries_within(1.0) and q.take_interactive(8) == []  # bulk does not count
    q.put(job(2, 3))
    q.put(job(3, 3))
    q.put(job(4, 3))
    assert q.queries_within(1.0) and not q.queries_within(0.0)
    assert [j.token for j in q.take_interactive(6)] == [2, 3]
    assert [j.token for j in q.take_interactive(6)] == [4]
    assert q.take_interactive(6) == [] and len(q) == 1


class PassModel:
    """A model that records its passes (a unit test of the runner, not an engine)."""

    lane, kinds, dim, prepare_workers, normalizes = "text", frozenset({"text"}), 2, 0, False

    def __init__(self) -> None:
        self.passes: list[int] = []

    def prepare(self, kind: str, items: list[Any], input_type: str | None) -> list[Any]:
        return list(items)

    def cost(self, prepared: Any) -> int:
        return 1

    def forward(self, kind: str, inputs: list[Any]) -> Any:
        import numpy as np

        self.passes.append(len(inputs))
        return np.ones((len(inputs), 2), dtype=np.float32)


def test_a_split_batch_lets_queries_run_between_its_passes() -> None:
    from zembed.engines.compute import BatchRunner

    model = PassModel()
    runner = BatchRunner(model, max_batch=8)  # type: ignore[arg-type]
    between: list[int] = []
    bulk = job(1, 8)
    out = runner.run([bulk], time.monotonic() + 0, pass_items=3,
                     between=lambda: between.append(len(model.passes)))
    assert model.passes == [3, 3, 2] and between == [1, 2]  # before every pass but the first
    assert out[0].status == 200 and out[0].n == 8
    model.passes.clear()
    runner.run([job(2, 8)], time.monotonic())
    assert model.passes == [8]  # not split: one pass of max_batch

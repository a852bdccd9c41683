"""Batch formation: FIFO, one kind per batch, bounded by items, old connections dropped."""

from __future__ import annotations

import threading
import time

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


def test_drop_old_generation() -> None:
    q = JobQueue()
    q.put(job(1, 1, gen=1))
    q.put(job(2, 1, gen=2))
    assert q.drop_generation_before(2) == 1
    assert [j.token for j in q.take_batch(32, 0.1)] == [2]


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
    assert q.drop_generation_before(1) == 1 and len(q) == 1
    assert [j.token for j in q.take_batch(12, 0.1)] == [3]

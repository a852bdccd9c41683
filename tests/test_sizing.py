"""Engines size themselves at warm-up: the choice rule on made-up curves, the measurement on a
fake clock, one real engine sized end to end, and the tests-only batch delay."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Stack

from zembed.engines.sizing import (
    Plan,
    Point,
    auto_credits,
    candidate_sizes,
    choose,
    keep_all_cores,
    measure_curve,
    short_sizes,
    size_engine,
    token_budget,
)


def curve_of(ms: Callable[[int], float], sizes: list[int]) -> list[Point]:
    return [Point(n, ms(n), n / ms(n) * 1000) for n in sizes]


class FakeMachine:
    """A clock and a forward pass of ``fixed_ms + per_item_ms * n`` on it (threads divide the
    per-item part by ``speedup[threads]``)."""

    def __init__(self, fixed_ms: float, per_item_ms: float,
                 speedup: dict[int, float] | None = None) -> None:
        self.now = 0.0
        self.fixed_ms, self.per_item_ms = fixed_ms, per_item_ms
        self.speedup = speedup or {}
        self.threads = 1
        self.passes: list[int] = []

    def clock(self) -> float:
        return self.now

    def run_pass(self, n: int) -> None:
        self.passes.append(n)
        per_item = self.per_item_ms / self.speedup.get(self.threads, 1.0)
        self.now += (self.fixed_ms + per_item * n) / 1000

    def set_threads(self, n: int) -> None:
        self.threads = n


SIZES = candidate_sizes("cpu")


def test_plateau_picks_the_smallest_near_best_batch() -> None:
    # A fixed 10 ms per pass plus 5 ms per item: items/s rises to a plateau of ~200/s.
    curve = curve_of(lambda n: 10 + 5 * n, SIZES)
    chosen = choose(curve, pass_budget_ms=10_000)  # no latency limit
    best = max(pt.items_per_s for pt in curve)
    assert chosen.items_per_s >= 0.95 * best
    smaller = [pt for pt in curve if pt.batch < chosen.batch]
    assert all(pt.items_per_s < 0.95 * best for pt in smaller)
    assert chosen.batch == 64  # 64: 193/s; 32: 188/s < 0.95 x 199/s (256)
    assert choose(curve, 10_000, near=1.0).batch == 256  # near=1: the very best


def test_the_pass_budget_caps_the_batch() -> None:
    curve = curve_of(lambda n: 10 + 5 * n, SIZES)
    chosen = choose(curve, pass_budget_ms=100)  # 16 items = 90 ms fits, 32 = 170 ms does not
    assert chosen.batch == 16
    assert all(pt.ms <= 100 for pt in curve if pt.batch <= chosen.batch)


def test_nothing_fits_gives_the_smallest_batch() -> None:
    curve = curve_of(lambda n: 500 + n, [4, 8, 16])
    assert choose(curve, pass_budget_ms=100).batch == 4
    with pytest.raises(ValueError):
        choose([], 100)


def test_measure_curve_times_each_size_and_stops_past_twice_the_budget() -> None:
    m = FakeMachine(fixed_ms=10, per_item_ms=5)
    curve = measure_curve(m.run_pass, SIZES, budget_s=0.1, clock=m.clock)
    # 32 items take 170 ms, past 2 x 100 ms? no; 64 take 330 ms: measured, then stop.
    assert [pt.batch for pt in curve] == [1, 2, 4, 8, 16, 32, 64]
    for pt in curve:
        assert pt.ms == pytest.approx(10 + 5 * pt.batch)
        assert pt.items_per_s == pytest.approx(pt.batch / (10 + 5 * pt.batch) * 1000)
        timed = m.passes.count(pt.batch) - 1  # one untimed pass per size
        assert timed >= 2 and timed * pt.ms >= 50
    assert m.passes.count(1) - 1 >= 4  # a 15 ms pass is timed until 50 ms have passed
    assert 128 not in m.passes


def test_measure_curve_stops_early_when_even_small_batches_are_too_slow() -> None:
    m = FakeMachine(fixed_ms=900, per_item_ms=1)
    curve = measure_curve(m.run_pass, SIZES, budget_s=0.1, clock=m.clock)
    # Three sizes at least (one slow moment at batch 1 must not decide), then stop.
    assert [pt.batch for pt in curve] == [1, 2, 4]
    assert m.passes == [1, 1, 2, 2, 4, 4]  # far over budget: one untimed, one timed pass each
    assert choose(curve, 100).batch == 1  # nothing fits: the smallest


def test_measure_curve_real_clock_stays_short() -> None:
    """With time.sleep standing in for the model (2 ms + 5 ms/item, ~200 items/s), a 100 ms
    pass budget measures up to 64 items in well under the warm-up allowance."""
    start = time.perf_counter()
    curve = measure_curve(lambda n: time.sleep((2 + 5 * n) / 1000), SIZES, budget_s=0.1)
    assert time.perf_counter() - start < 3.0
    assert curve[-1].batch == 64 and choose(curve, 100).batch in (8, 16)


def test_thread_rule_needs_a_quarter_more_throughput() -> None:
    fewer = Point(16, 100, 160)
    assert keep_all_cores(fewer, Point(16, 80, 200))  # exactly 1.25x
    assert not keep_all_cores(fewer, Point(32, 160, 199))
    assert keep_all_cores(fewer, Point(8, 30, 266), factor=1.5) is True


@pytest.mark.parametrize("speedup,expected", [(1.3, 2), (1.1, 1)])
def test_size_engine_measures_all_cores_only_when_threads_are_auto(
        speedup: float, expected: int) -> None:
    m = FakeMachine(fixed_ms=10, per_item_ms=5, speedup={2: speedup})
    sizing = size_engine(m.run_pass, Plan(latency_target_ms=200), "cpu", m.set_threads,
                         threads_now=1, all_cores=2, clock=m.clock)
    assert sizing.threads == expected and m.threads == expected
    assert sizing.credits == auto_credits(sizing.chosen, 200, 1)
    assert sizing.credits >= 2 * sizing.max_batch
    assert sizing.auto == ["max_batch", "credits", "threads"]
    assert sizing.max_batch in [pt.batch for pt in sizing.curve]
    ready = sizing.to_ready()
    assert ready["threads"] == expected and ready["latency_target_ms"] == 200
    assert [row[0] for row in ready["curve"]] == [pt.batch for pt in sizing.curve]

    fixed = FakeMachine(fixed_ms=10, per_item_ms=5, speedup={2: 3.0})
    sized = size_engine(fixed.run_pass, Plan(threads=1), "cpu", fixed.set_threads,
                        threads_now=1, all_cores=2, clock=fixed.clock)
    assert sized.threads == 1 and fixed.threads == 1 and sized.auto == ["max_batch", "credits"]


def test_fixed_sizes_are_kept_and_only_a_short_curve_is_measured() -> None:
    m = FakeMachine(fixed_ms=10, per_item_ms=5)
    sizing = size_engine(m.run_pass, Plan(max_batch=32, credits=64, threads=1), "cpu",
                         m.set_threads, threads_now=1, all_cores=2, clock=m.clock)
    assert (sizing.max_batch, sizing.credits, sizing.auto) == (32, 64, [])
    assert [pt.batch for pt in sizing.curve] == short_sizes(32) == [1, 4, 16, 32]
    assert sizing.chosen.batch == 32
    assert sizing.describe().startswith("sized: batch 32, 64 credits, 1 thread(s), target 200 ms "
                                        "(all fixed; measured in ")
    # max_batch fixed, credits auto: from the operator's batch, which is measured.
    sizing = size_engine(m.run_pass, Plan(max_batch=12, threads=1, min_credits=4), "cpu",
                         m.set_threads, threads_now=1, all_cores=2, clock=m.clock)
    assert (sizing.max_batch, sizing.auto) == (12, ["credits"])
    assert sizing.credits == auto_credits(sizing.chosen, 200, 4)
    assert [pt.batch for pt in sizing.curve] == [1, 2, 4, 8, 12]
    floored = size_engine(m.run_pass, Plan(max_batch=12, threads=1, min_credits=64), "cpu",
                          m.set_threads, threads_now=1, all_cores=2, clock=m.clock)
    assert floored.credits == 64


def test_auto_credits_is_the_most_of_double_buffering_little_and_the_floor() -> None:
    assert auto_credits(Point(16, 60, 250), 200, 64) == 64  # the floor: two 32-text requests
    assert auto_credits(Point(16, 60, 250), 1000, 64) == 250  # one target's worth in flight
    assert auto_credits(Point(128, 20, 6400), 100, 64) == 640  # a GPU: Little's law
    assert auto_credits(Point(1, 138, 7), 200, 16) == 16  # a slow image engine keeps 16
    assert auto_credits(Point(64, 10, 100), 100, 1) == 128  # twice the batch


def test_token_budget() -> None:
    assert token_budget(2000.0, 100, 16, 256) == 512  # 200 tokens/pass < 32 per item of 16
    assert token_budget(100_000.0, 100, 16, 256) == 10_000  # a fast engine: what fits
    assert token_budget(100.0, 50, 1, 512) == 512  # at least one long text
    assert token_budget(12_345.0, 100, 1, 8) % 8 == 0


def test_candidate_sizes() -> None:
    assert candidate_sizes("cpu") == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert candidate_sizes("cuda")[-1] == 1024
    assert candidate_sizes("cpu", 48) == [1, 2, 4, 8, 16, 32, 48]
    assert candidate_sizes("cpu", 64) == [1, 2, 4, 8, 16, 32, 64]


# -- real processes --------------------------------------------------------------------------


def test_a_real_text_engine_sizes_itself_and_announces_it(
        stack_factory: Callable[[], Stack]) -> None:
    stack = stack_factory()
    stack.start_broker()
    stack.start_text("--credits", "0", "--max-batch", "0", "--threads", "1",
                     "--max-batch-tokens", "-1",
                     "--latency-target-ms", "200")
    stack.wait_engines("text", 1)
    with stack.client() as c:
        info = c.info(timeout=5)["lanes"]["text"]
        engine = c.stats(timeout=5)["lanes"]["text"]["engines"][0]
    max_batch = info["max_batch"]
    assert engine["credits_total"] >= max(64, 2 * max_batch)
    assert engine["warmup_items_per_s"] > 0
    sizing = engine.get("sizing")
    assert sizing is not None, "the broker's stats do not show the engine's READY sizing"
    curve = sizing["curve"]
    batches = [row[0] for row in curve]
    assert curve and batches == sorted(batches) and len(set(batches)) == len(batches)
    assert max_batch in batches and sizing["max_batch"] == max_batch
    assert sizing["credits"] == engine["credits_total"] and sizing["threads"] == 1
    assert sizing["auto"] == ["max_batch", "credits", "max_batch_tokens"]
    assert sizing["latency_target_ms"] == 200
    # The token budget, measured on long texts, never cuts a pass of short queries.
    assert sizing["max_batch_tokens"] >= 32 * max_batch and sizing["max_batch_tokens"] % 8 == 0
    chosen = next(row for row in curve if row[0] == max_batch)
    assert chosen[1] <= 100 or max_batch == 1  # its pass fits half the target
    assert engine["warmup_items_per_s"] == pytest.approx(chosen[2], rel=0.01)


def test_batch_delay_file_slows_every_batch(stack_factory: Callable[[], Stack],
                                            tmp_path: Path) -> None:
    delay = tmp_path / "delay-ms"
    delay.write_text("300")
    stack = stack_factory()
    stack.start_broker()
    stack.start_text("--batch-delay-file", str(delay))
    stack.wait_engines("text", 1)
    with stack.client(timeout=10.0) as c:
        t0 = time.perf_counter()
        c.embed_texts(["slowed down"])
        assert time.perf_counter() - t0 >= 0.3
        delay.write_text("0")
        t0 = time.perf_counter()
        c.embed_texts(["fast again"])
        assert time.perf_counter() - t0 < 0.3
        delay.write_text("not a number")  # garbage means no delay
        t0 = time.perf_counter()
        c.embed_texts(["still fast"])
        assert time.perf_counter() - t0 < 0.3

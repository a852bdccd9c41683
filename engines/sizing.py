"""Size an engine to its machine at warm-up: batch, credits and threads from a measured curve.

A fixed batch of 32 and 64 credits is right for one machine only. On a small CPU a pass of 32
may take longer than a request should wait; on a GPU 32 leaves most of the throughput unused.
So the engine measures its own throughput curve (items/s against batch size) and picks:

- **max_batch**: the smallest batch within ``near`` (95%) of the best items/s among batches
  whose forward pass fits the *pass budget*, half the latency target. A request admitted while
  a pass runs waits at most for that pass, then for its own, so two passes must fit the
  target. Past the knee of the curve a bigger batch buys no throughput, only latency.
- **credits**: the most of three: twice the batch (double buffering: the next batch queues
  while one runs); what the engine completes in one latency target at that batch (Little's
  law: that much in flight waits about one target); and a floor per model kind (64 texts, 16
  images) that keeps two typical client requests admissible. Twice the batch alone was
  measured to halve served items/s (bench_sizing: a batch of 16 and 32 credits let one
  32-item request in at a time, and the engine idled between a reply and the next admission;
  129 items/s against 244 with 64 credits), and sized an image engine to 2 credits, so that a
  request of 3 images was a 413. Credits are the ceiling the broker's adaptive limit moves
  under, when the lane has a latency target, so erring high costs little there.
- **threads** (only when the operator left both ``threads`` and ``max_batch`` automatic): the
  available cores less one, unless the curve with every core is at least 1.25x faster. The core
  left free runs the socket thread, the broker and clients. Which way it goes depends on the
  machine, hence a measured rule: on one 2-core machine every core cost more than it gave for
  1-item requests (engines/devices.py); on another, both cores served 1.8x the items/s of one
  (benchmarks/README.md, bench_sizing).

Nothing here imports torch: the model hands in a ``run_pass(n)`` that runs one forward pass of
``n`` items and a ``set_threads`` callback, so the rule is unit-testable with a fake clock.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("zembed.engine")

#: A batch is "near the best" when its items/s is at least this share of the best feasible one.
NEAR = 0.95
#: All cores are kept only when they give at least this many times the items/s of cores - 1.
ALL_CORES_FACTOR = 1.25
#: Timed passes per size: at least this many, and for small (fast) batches enough to take
#: :data:`MIN_TIMED_S`, so a 2 ms pass is not judged on one timer reading.
MIN_PASSES = 2
MIN_TIMED_S = 0.05
#: Sizes always measured before stopping early: one disturbed pass at batch 1 (another process
#: busy for a moment) must not end the curve there and size the engine to batch 1.
MIN_POINTS = 3
#: Largest batch measured: a CPU's curve is flat long before 256; a GPU's rises further.
MAX_SIZE = {"cpu": 256, "cuda": 1024}
#: Warm-up never spends more than this measuring one curve, whatever the machine (a slow CPU
#: with a large model would otherwise measure for minutes), s.
CURVE_TIME_CAP_S = 20.0


@dataclass(frozen=True, slots=True)
class Point:
    """One measured batch size: its forward-pass time and the throughput it gives."""

    batch: int
    ms: float  # per forward pass
    items_per_s: float


@dataclass(frozen=True, slots=True)
class Plan:
    """What the operator fixed and what warm-up is to choose (0 = choose it).

    :param max_batch: items per forward pass; 0 = sized from the curve.
    :param credits: items in flight; 0 = :func:`auto_credits`.
    :param threads: torch threads; 0 = cores - 1, or all cores when measured worth it.
    :param latency_target_ms: what a request should wait at most; a pass gets half.
    :param max_size: largest batch the model can take in one pass (a text model's token
        budget); 0 = no limit of its own.
    """

    max_batch: int = 0
    credits: int = 0
    threads: int = 0
    latency_target_ms: float = 200.0
    max_size: int = 0
    min_credits: int = 1  # the floor of automatic credits (64 for text, 16 for images)

    @property
    def pass_budget_ms(self) -> float:
        """Half the target: a request may wait for the pass that runs, then for its own."""
        return self.latency_target_ms / 2


@dataclass(frozen=True)
class Sizing:
    """What warm-up chose, and the curve it chose from (READY and stats carry it)."""

    curve: list[Point]
    threads: int
    max_batch: int
    credits: int
    latency_target_ms: float
    auto: list[str] = field(default_factory=list)
    #: How long measuring took (the log says it; warm-up time is start-up time), s.
    measure_s: float = 0.0
    #: Text engines: most padded tokens in one pass (0: no limit; see :func:`token_budget`).
    max_batch_tokens: int = 0

    @property
    def chosen(self) -> Point:
        """The measured point at the chosen batch (the largest measured one below it if the
        operator's batch was not measured)."""
        return point_at(self.curve, self.max_batch)

    def to_ready(self) -> dict[str, Any]:
        """The msgpack-able ``sizing`` field of READY."""
        return {"curve": [[pt.batch, round(pt.ms, 2), round(pt.items_per_s, 1)]
                          for pt in self.curve],
                "threads": self.threads, "max_batch": self.max_batch, "credits": self.credits,
                "latency_target_ms": self.latency_target_ms, "auto": list(self.auto),
                "max_batch_tokens": self.max_batch_tokens}

    def describe(self) -> str:
        """One log line: the choice, then the curve as ``batch:ms/items-per-s``."""
        curve = " ".join(f"{pt.batch}:{pt.ms:.0f}ms/{pt.items_per_s:.0f}/s" for pt in self.curve)
        auto = f"auto: {', '.join(self.auto)}" if self.auto else "all fixed"
        tokens = f", {self.max_batch_tokens} tokens a pass" if self.max_batch_tokens else ""
        return (f"sized: batch {self.max_batch}{tokens}, {self.credits} credits, {self.threads} "
                f"thread(s), target {self.latency_target_ms:g} ms ({auto}; measured in "
                f"{self.measure_s:.1f}s); curve {curve}")


def point_at(curve: list[Point], batch: int) -> Point:
    """The measured point of ``batch`` in an ascending curve, or the largest measured below
    it (a curve that stopped early), or the first."""
    fits = [pt for pt in curve if pt.batch <= batch]
    return fits[-1] if fits else curve[0]


def candidate_sizes(device_type: str, cap: int = 0) -> list[int]:
    """Powers of two from 1 to the device's largest size, capped at ``cap`` (> 0), which is
    added itself when it is not a power of two (the operator's batch is always measured)."""
    top = MAX_SIZE.get(device_type, MAX_SIZE["cuda"])
    sizes = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
    if cap > 0:
        sizes = [s for s in sizes if s < cap] + [cap]
    return sizes


def short_sizes(max_batch: int) -> list[int]:
    """A cheap curve for an engine whose sizes are all fixed: 1, then x4 up to ``max_batch``.

    Nothing is chosen from it; it is measured so READY and stats show what the fixed batch
    gives, for about what the old fixed-batch warm-up cost.
    """
    sizes = [1]
    while sizes[-1] * 4 < max_batch:
        sizes.append(sizes[-1] * 4)
    return sorted({*sizes, max(1, max_batch)})


def measure_curve(run_pass: Callable[[int], object], sizes: list[int], budget_s: float,
                  clock: Callable[[], float] = time.perf_counter,
                  time_cap_s: float = CURVE_TIME_CAP_S) -> list[Point]:
    """Time ``run_pass(n)`` for each size in ascending order.

    Each size gets one untimed pass (new shapes cost allocations and kernel selection), then at
    least :data:`MIN_PASSES` timed passes and enough to take :data:`MIN_TIMED_S`; a size's time
    is the median pass. Measuring stops after the first size whose pass took more than twice
    ``budget_s`` (the pass budget), once :data:`MIN_POINTS` sizes are measured: bigger batches
    only take longer, and none of them could be chosen. It also stops once ``time_cap_s`` has
    been spent, so warm-up stays bounded.
    """
    curve: list[Point] = []
    start = clock()
    for n in sorted(sizes):
        t0 = clock()
        run_pass(n)
        untimed = clock() - t0
        times: list[float] = []
        spent = 0.0
        while len(times) < MIN_PASSES or spent < MIN_TIMED_S:
            t0 = clock()
            run_pass(n)
            times.append(clock() - t0)
            spent += times[-1]
            if untimed > 4 * budget_s:
                break  # far over budget: one timed pass says enough, and it is an expensive one
        per_pass = statistics.median(times)
        curve.append(Point(n, per_pass * 1000, n / per_pass if per_pass > 0 else float("inf")))
        too_slow = per_pass > 2 * budget_s and len(curve) >= MIN_POINTS
        if too_slow or clock() - start > time_cap_s:
            break
    return curve


def choose(curve: list[Point], pass_budget_ms: float, near: float = NEAR) -> Point:
    """The smallest batch whose items/s is within ``near`` of the best among those whose pass
    fits ``pass_budget_ms``; the smallest measured batch when none fits.

    The smallest near-best batch, not the best: on the plateau a bigger batch adds latency (a
    longer pass to wait for) and gains next to nothing.
    """
    if not curve:
        raise ValueError("no measured points to choose from")
    feasible = [pt for pt in curve if pt.ms <= pass_budget_ms]
    if not feasible:
        return min(curve, key=lambda pt: pt.batch)
    best = max(pt.items_per_s for pt in feasible)
    return min((pt for pt in feasible if pt.items_per_s >= near * best), key=lambda pt: pt.batch)


def auto_credits(point: Point, latency_target_ms: float, floor: int) -> int:
    """Credits for an engine whose chosen batch is ``point``: twice the batch, what it
    completes in one latency target, or ``floor``, whichever is most (see the module doc)."""
    in_target = int(point.items_per_s * latency_target_ms / 1000)
    return max(2 * point.batch, in_target, floor)


def token_budget(tokens_per_s: float, pass_budget_ms: float, max_batch: int,
                 width: int) -> int:
    """``max_batch_tokens`` for a text engine: the padded tokens a pass of long texts (each
    ``width`` tokens, measured at ``tokens_per_s``) gets through in the pass budget, rounded
    down to a multiple of 8; at least 32 per item of the batch, so that passes of short texts
    (search queries) are never cut by it, and at least one long text."""
    budget = int(tokens_per_s * pass_budget_ms / 1000) // 8 * 8
    return max(budget, 32 * max_batch, width)


def keep_all_cores(fewer: Point, all_cores: Point, factor: float = ALL_CORES_FACTOR) -> bool:
    """Whether the choice with every core beats the one with a core left free by ``factor``.

    In warm-up nothing else runs; served, the socket thread, broker and clients preempt torch's
    threads, and a parallel region waits for its slowest thread. A free core is worth up to
    ``factor`` of measured throughput.
    """
    return all_cores.items_per_s >= factor * fewer.items_per_s


def size_engine(run_pass: Callable[[int], None], plan: Plan, device_type: str,
                set_threads: Callable[[int], None], threads_now: int, all_cores: int,
                clock: Callable[[], float] = time.perf_counter) -> Sizing:
    """Measure and choose what ``plan`` leaves open; return the choice with its curve.

    ``threads_now`` is the thread count the model runs with (the operator's, or cores - 1);
    ``all_cores`` the available cores. The thread count is only measured on CPU, when both
    ``threads`` and ``max_batch`` are automatic and all cores differ from ``threads_now``;
    ``set_threads`` is then left at the count chosen.
    """
    started = clock()
    budget_s = plan.pass_budget_ms / 1000
    auto = [name for name, value in (("max_batch", plan.max_batch), ("credits", plan.credits),
                                     ("threads", plan.threads)) if value == 0]
    threads = threads_now
    if plan.max_batch > 0:
        sizes = (short_sizes(plan.max_batch) if plan.credits > 0
                 else candidate_sizes(device_type, plan.max_batch))
        curve = measure_curve(run_pass, sizes, budget_s, clock)
        batch = plan.max_batch
    else:
        sizes = candidate_sizes(device_type, plan.max_size)
        curve = measure_curve(run_pass, sizes, budget_s, clock)
        point = choose(curve, plan.pass_budget_ms)
        if plan.threads == 0 and device_type == "cpu" and all_cores != threads_now:
            set_threads(all_cores)
            wide = measure_curve(run_pass, sizes, budget_s, clock)
            wide_point = choose(wide, plan.pass_budget_ms)
            log.info("with all %d cores: batch %d at %.0f items/s, against %.0f with %d",
                     all_cores, wide_point.batch, wide_point.items_per_s, point.items_per_s,
                     threads_now)
            if keep_all_cores(point, wide_point):
                threads, curve, point = all_cores, wide, wide_point
            else:
                set_threads(threads_now)
        batch = point.batch
    credits = plan.credits if plan.credits > 0 else auto_credits(
        point_at(curve, batch), plan.latency_target_ms, plan.min_credits)
    return Sizing(curve, threads, batch, credits, plan.latency_target_ms, auto,
                  measure_s=clock() - started)

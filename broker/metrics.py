"""Measuring instruments of the broker loop: latency histograms, a recent window, loop time.

Each costs O(1) or O(log buckets) per observation, so the request path pays a bisect and
two additions; everything heavier (quantiles, packing) happens once per stats interval.
All times are ``time.monotonic()`` seconds passed in by the caller, as in ``state.py``.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from typing import Any

import numpy as np

#: Upper bounds of the latency buckets, seconds. Fixed, so counts from broker restarts and
#: from several brokers add up; from 50 µs (an all-hit or a 429) to a minute (big images).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Recent-latency quantiles cover this much time...
WINDOW_S = 10.0
#: ...and at most this many of the latest observations.
WINDOW_MAX = 4096
#: The window quantiles reported, by name.
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99))


class Histogram:
    """Counts by fixed upper bound (``value <= bound``), with their sum: Prometheus style."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """``le`` (bounds, s), cumulative ``counts`` (one more: +Inf = count), ``sum_s``."""
        cumulative, total = [], 0
        for n in self.counts:
            total += n
            cumulative.append(total)
        return {"le": list(self.bounds), "counts": cumulative, "count": self.count,
                "sum_s": round(self.sum, 6)}


class LatencyWindow:
    """The latest observations (at most ``WINDOW_MAX``, none older than ``WINDOW_S``).

    A ring of two flat float arrays: recording is two stores, and the quantiles read the ring
    through numpy without copying it item by item.
    """

    __slots__ = ("_next", "times", "values", "window_s")

    def __init__(self, window_s: float = WINDOW_S, max_samples: int = WINDOW_MAX) -> None:
        self.window_s = window_s
        self.times = array("d", [-math.inf]) * max_samples  # -inf: an empty slot, never recent
        self.values = array("d", [0.0]) * max_samples
        self._next = 0

    def observe(self, now: float, value_s: float) -> None:
        i = self._next
        self.times[i] = now
        self.values[i] = value_s
        self._next = (i + 1) % len(self.values)

    def quantiles_ms(self, now: float) -> dict[str, Any]:
        """Nearest-rank p50/p90/p95/p99, max (ms) and the number of samples (``window``).

        Empty ({}) when nothing was observed in the window.
        """
        times = np.frombuffer(self.times, dtype=np.float64)
        recent = np.frombuffer(self.values, dtype=np.float64)[times >= now - self.window_s]
        n = len(recent)
        if not n:
            return {}
        ranked = np.sort(recent) * 1000
        out: dict[str, Any] = {name: round(float(ranked[max(0, math.ceil(q * n) - 1)]), 3)
                               for name, q in QUANTILES}
        out["max"] = round(float(ranked[-1]), 3)
        out["window"] = n
        return out


class LoopMeter:
    """Where the broker loop's time goes: turns, busy seconds, the longest turn.

    ``busy`` is the time spent outside ``poll()``: handling messages, cache reads, timers.
    ``roll`` closes an interval and keeps its utilisation and longest turn for the stats.
    """

    __slots__ = ("busy_s", "busy_since", "interval_max_s", "last_max_turn_s", "last_roll",
                 "last_utilisation", "rolled_busy_s", "turns")

    def __init__(self, now: float) -> None:
        self.turns = 0
        self.busy_s = 0.0
        self.busy_since: float | None = None  # set while a turn runs (the watchdog reads it)
        self.interval_max_s = 0.0
        self.last_roll = now
        self.rolled_busy_s = 0.0
        self.last_utilisation = 0.0
        self.last_max_turn_s = 0.0

    def begin(self, now: float) -> None:
        self.busy_since = now

    def end(self, now: float) -> None:
        started = self.busy_since
        self.busy_since = None
        if started is None:
            return
        took = now - started
        self.turns += 1
        self.busy_s += took
        if took > self.interval_max_s:
            self.interval_max_s = took

    def roll(self, now: float) -> None:
        """Close the current interval: its utilisation (0..1) and longest turn are kept."""
        elapsed = now - self.last_roll
        if elapsed > 0:
            self.last_utilisation = min(1.0, (self.busy_s - self.rolled_busy_s) / elapsed)
        self.last_max_turn_s = self.interval_max_s
        self.interval_max_s = 0.0
        self.rolled_busy_s = self.busy_s
        self.last_roll = now

    def snapshot(self) -> dict[str, Any]:
        return {"turns": self.turns, "busy_s": round(self.busy_s, 6),
                "utilisation": round(self.last_utilisation, 4),
                "max_turn_ms": round(self.last_max_turn_s * 1000, 3)}

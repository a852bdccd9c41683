"""Adaptive credits: move an engine's admission limit so accepted requests meet a latency target.

Fixed credits are a guess: too few idle the model, too many make every accepted request wait
behind a long queue (at 2x overload with 64 credits, accepted requests took 1.15 s at p50). A
lane with a latency target instead lets each engine's limit follow what the broker measures:
the time from dispatching an engine request to its reply, which is the engine's queueing delay
plus its batch time.

The control law is AIMD, as in Netflix's concurrency-limits (``AIMDLimit``: grow while
samples are good and the limit is in use, cut by a ratio when one is late) with two changes
from TCP congestion control that this setting needs:

- **One cut per round trip.** Every request dispatched before a cut was admitted under the
  old limit, so its lateness says nothing about the new one; only a late request dispatched
  after the last cut cuts again (TCP's once-per-window decrease). Without it, one slow batch
  answered as 64 late replies would cut 64 times.
- **Cuts in proportion to the lateness** (the gradient idea of concurrency-limits' Gradient2 and
  Envoy's adaptive concurrency, ``limit x target / measured``), bounded to 0.5 … 0.9 of the
  limit: an engine slowed 5x comes down in two or three round trips, not twenty.

Growth is a quarter of an engine batch per round trip (``step x n / limit`` per completed
request of ``n`` items), and only while the limit is wanted: the engine is at least half used,
or a request was refused for want of credits under the limit since the last reply (with a bulk
reserve, bulk work alone may never fill half the limit, yet it is refused by it). An idle lane
does not grow a limit it never tested. A whole batch per round trip overshot: on a CPU engine whose
feasible limit was about 40 items, it added 32 per round trip and held accepted p99 at 2.5x a
500 ms target. The limit starts at two batches, not at what the engine announced (starting
there made the first seconds of an overload wait behind 256 items), and stays within
``[floor, announced credits]``: the broker never admits more than the engine announced in
READY, and the floor (by default the engine's ``max_batch``) keeps full batches possible.

Per completed request this costs a few float operations; nothing runs per refused request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Smallest and largest multiplicative cut applied to a late sample.
CUT_MIN, CUT_MAX = 0.5, 0.9


@dataclass(slots=True)
class AimdLimit:
    """The adaptive credit limit of one engine.

    :param target_s: latency target of the engine's lane (dispatch to reply), s.
    :param floor: the limit never goes below this (items).
    :param ceiling: nor above this: the credits the engine announced (items).
    :param step: growth per round trip, items (a quarter of the engine's batch).
    :param value: the starting limit (0: the ceiling; :func:`for_engine` starts at two batches).
    """

    target_s: float
    floor: int
    ceiling: int
    step: int
    value: float = 0.0
    cut_at: float = -math.inf  # when the limit was last cut
    cuts: int = 0
    late: int = 0  # samples over the target
    samples: int = 0
    wanted: bool = False  # a request was refused under this limit since the last reply

    def __post_init__(self) -> None:
        self.step = max(1, self.step)
        if self.value <= 0:
            self.value = float(self.ceiling)  # a caller that gives no start: the ceiling
        self.rebound(self.ceiling, self.floor)

    @property
    def limit(self) -> int:
        """The credits the broker may have in flight on the engine now."""
        return int(self.value)

    def sample(self, latency_s: float, n: int, started: float, used: int, now: float) -> bool:
        """Take one completed engine request; True if the limit changed.

        ``latency_s``: dispatch to reply. ``n``: its items. ``started``: when it was
        dispatched. ``used``: credits still in flight on the engine after it.
        """
        self.samples += 1
        before = int(self.value)
        if latency_s > self.target_s:
            self.late += 1
            if started < self.cut_at:
                return False  # admitted under the limit before the last cut
            ratio = min(CUT_MAX, max(CUT_MIN, self.target_s / latency_s))
            self.value = max(float(self.floor), self.value * ratio)
            self.cut_at = now
            self.cuts += 1
        elif self.wanted or (used + n) * 2 >= self.value:
            self.value = min(float(self.ceiling), self.value + self.step * n / self.value)
        self.wanted = False
        return int(self.value) != before

    def rebound(self, ceiling: int, floor: int) -> None:
        """The engine announced other credits (its share when it serves several brokers
        changed): new bounds, the limit kept within them."""
        self.ceiling = max(1, ceiling)
        self.floor = max(1, min(floor, self.ceiling))
        self.value = min(max(self.value, self.floor), self.ceiling)

    def view(self) -> dict[str, float | int]:
        """What the stats show of the controller (docs/stats.md)."""
        return {"limit": self.limit, "floor": self.floor, "ceiling": self.ceiling,
                "target_ms": round(self.target_s * 1000, 1), "cuts": self.cuts,
                "late": self.late, "samples": self.samples}


def for_engine(target_s: float, floor: int, credits: int, max_batch: int) -> AimdLimit:
    """The controller of a newly registered engine: it starts at two batches (within bounds)
    and grows by a quarter batch per round trip."""
    floor = floor or max_batch
    start = min(credits, max(floor, 2 * max_batch))
    return AimdLimit(target_s, floor, credits, step=max(1, max_batch // 4), value=float(start))


def parse_targets(specs: tuple[str, ...], lanes: tuple[str, ...]) -> dict[str, float]:
    """``--latency-target-ms`` entries (``LANE=MS`` or a bare ``MS`` for every lane) to
    seconds by lane; raise ValueError naming the bad entry."""
    targets: dict[str, float] = {}
    for spec in specs:
        lane, sep, value = spec.rpartition("=")
        names = [lane.strip()] if sep else list(lanes)
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"latency target {spec!r}: expected LANE=MS or MS") from None
        if not math.isfinite(ms) or ms <= 0:
            raise ValueError(f"latency target {spec!r}: must be a positive number of ms")
        for name in names:
            if name not in lanes:
                raise ValueError(f"latency target {spec!r}: lane {name!r} is not served "
                                 f"({', '.join(lanes)})")
            targets[name] = ms / 1000
    return targets

"""BrokerState without sockets: credits, admission, deadlines, liveness, late replies."""

from __future__ import annotations

from typing import Any

import pytest

from zembed import protocol as p
from zembed.broker.state import BrokerState
from zembed.errors import BadRequest, EngineUnavailable, Overloaded, TooLarge, UnknownLane


def ready(credits: int = 8, fingerprint: str = "fp-a", lane: str = "text") -> dict[str, Any]:
    return {"lane": lane, "kinds": ["text"], "fingerprint": fingerprint, "dim": 4,
            "credits": credits, "max_batch": 4, "model": "m"}


@pytest.fixture
def state() -> BrokerState:
    return BrokerState(("text", "image"), heartbeat_interval_s=1.0, liveness=3)


def test_most_free_credits_wins(state: BrokerState) -> None:
    a = state.register(b"a", ready(8), 0.0)
    b = state.register(b"b", ready(8), 0.0)
    state.dispatch(a, 3, 10.0, 0.0)
    assert state.admit("text", 2, 0.0) is b
    state.dispatch(b, 6, 10.0, 0.0)
    assert state.admit("text", 2, 0.0) is a
    assert (a.credits_free, b.credits_free) == (5, 2)


def test_credits_are_items_and_come_back(state: BrokerState) -> None:
    e = state.register(b"a", ready(4), 0.0)
    req = state.dispatch(state.admit("text", 4, 0.0), 4, 10.0, 0.0)
    with pytest.raises(Overloaded) as info:
        state.admit("text", 1, 0.0)
    assert info.value.retry_after > 0
    assert state.complete(b"a", req.token, 0.5) is req
    assert e.credits_free == 4
    assert state.admit("text", 4, 0.6) is e


def test_refusals(state: BrokerState) -> None:
    with pytest.raises(UnknownLane):
        state.admit("audio", 1, 0.0)
    with pytest.raises(EngineUnavailable):
        state.admit("image", 1, 0.0)
    state.register(b"a", ready(4), 0.0)
    with pytest.raises(TooLarge):
        state.admit("text", 5, 0.0)


def test_retry_after_follows_the_lane_rate(state: BrokerState) -> None:
    e = state.register(b"a", ready(10), 0.0)
    for i in range(10):  # 10 items/s: 20 items completed over the 2 s window
        req = state.dispatch(e, 2, 99.0, i * 0.2)
        state.complete(b"a", req.token, i * 0.2)
    state.dispatch(e, 10, 99.0, 2.0)
    with pytest.raises(Overloaded) as info:
        state.admit("text", 5, 2.0)
    # 5 missing credits at ~10 items/s is ~0.5 s.
    assert 0.3 <= info.value.retry_after <= 0.8


def test_late_and_foreign_replies_are_counted(state: BrokerState) -> None:
    state.register(b"a", ready(4), 0.0)
    b = state.register(b"b", ready(4), 0.0)
    req = state.dispatch(b, 1, 9.0, 0.0)
    assert state.complete(b"a", req.token, 0.1) is None  # not a's request
    assert state.complete(b"b", 12345, 0.1) is None  # unknown token
    assert state.late_replies == 2
    assert state.complete(b"b", req.token, 0.2) is req


def test_dead_engine_gives_back_its_requests(state: BrokerState) -> None:
    e = state.register(b"a", ready(4), 0.0)
    r1 = state.dispatch(e, 1, 0.5, 0.0)
    r2 = state.dispatch(e, 1, 9.0, 0.0)
    state.touch(b"a", 1.0)
    assert state.dead_engines(3.5) == []
    assert state.dead_engines(4.0) == [b"a"]
    lost = state.remove(b"a")
    assert sorted(r.token for r in lost) == sorted([r1.token, r2.token])
    assert state.inflight == {}
    assert state.models["text"].dim == 4  # the lane's model is remembered for cache hits
    assert state.complete(b"a", r2.token, 4.1) is None  # late reply of a dead engine
    with pytest.raises(EngineUnavailable):
        state.admit("text", 1, 4.1)


def test_registration_checks(state: BrokerState) -> None:
    state.register(b"a", ready(4, "fp-a"), 0.0)
    with pytest.raises(BadRequest, match="serves model"):
        state.register(b"b", ready(4, "fp-b"), 0.0)
    with pytest.raises(BadRequest, match="twice"):
        state.register(b"a", ready(4, "fp-a"), 0.0)
    with pytest.raises(BadRequest, match="not served"):
        state.register(b"c", ready(4, lane="audio"), 0.0)
    with pytest.raises(BadRequest, match="incomplete"):
        state.register(b"d", {"lane": "text"}, 0.0)
    state.remove(b"a")
    state.register(b"b", ready(4, "fp-b"), 0.0)  # lane empty again: a new model may take it


def test_heartbeats_and_timers(state: BrokerState) -> None:
    e = state.register(b"a", ready(4), 0.0)
    assert state.heartbeat_due(0.5) == []
    assert state.heartbeat_due(1.0) == [e]
    assert state.heartbeat_due(1.5) == []
    assert state.next_timer(1.6) == pytest.approx(0.4)  # next heartbeat due at 2.0


def test_snapshot_counts(state: BrokerState) -> None:
    state.register(b"a", ready(4), 0.0)
    state.count("text", p.OK, 3)
    state.count("text", p.OVERLOADED, 2)
    snap = state.snapshot(0.1)
    lane = snap["lanes"]["text"]
    assert lane["requests"]["200"] == 1 and lane["items"]["200"] == 3
    assert lane["requests"]["429"] == 1 and lane["credits_free"] == 4
    assert state.missing_lanes(0.1) == ["image"]


def test_engine_and_broker_heartbeat_intervals_may_differ() -> None:
    """Heartbeat at the shorter interval; dead only after `liveness` of the longer one."""
    state = BrokerState(("text",), heartbeat_interval_s=0.2, liveness=3)
    slow = state.register(b"slow", {**ready(), "heartbeat_ms": 1000}, 0.0)
    fast = state.register(b"fast", {**ready(), "heartbeat_ms": 100}, 0.0)
    legacy = state.register(b"old", ready(), 0.0)  # no heartbeat_ms: the broker's own
    assert (slow.heartbeat_s, slow.expiry_s) == (0.2, 3.0)
    assert (fast.heartbeat_s, fast.expiry_s) == (0.1, pytest.approx(0.6))
    assert (legacy.heartbeat_s, legacy.expiry_s) == (0.2, pytest.approx(0.6))
    assert state.dead_engines(1.0) == [b"fast", b"old"]  # the 1 s engine is not dead at 1 s
    assert state.dead_engines(3.0) == [b"slow", b"fast", b"old"]
    assert {e.identity for e in state.heartbeat_due(0.15)} == {b"fast"}


def _refusal(state: BrokerState, n: int, now: float) -> int:
    """The ``retry_after_ms`` that a request of ``n`` items would get now."""
    with pytest.raises(Overloaded) as info:
        state.admit("text", n, now)
    return round(info.value.retry_after * 1000)


def test_retry_after_follows_the_announced_throughput_when_it_is_sooner(state: BrokerState) -> None:
    """Nothing completed in the window: in-flight requests are expected to finish in order at
    the engine's READY ``warmup_items_per_s``, an idle engine starting on a request at once."""
    e = state.register(b"a", {**ready(8), "warmup_items_per_s": 10.0}, 0.0)
    state.dispatch(e, 2, 99.0, 0.0)  # done at 0.2 s
    state.dispatch(e, 6, 99.0, 0.5)  # the engine was idle from 0.2: done at 0.5 + 0.6 = 1.1 s
    assert state.lane_rate("text", 0.6) == 0
    assert _refusal(state, 8, 0.6) == 500  # all 8 credits: when the second one is done
    assert state.retry_after_ms("text", 8, 0.6) == 500
    state.complete(b"a", min(e.inflight), 0.7)  # the 2-item one, late
    # Rate is now 1 item/s over the window, which says 6 missing credits / 1 item/s = 6 s;
    # the announced pace says the 6-item one is done at 1.1 s: the sooner estimate counts
    # (a lane idle for most of the window is not a slow lane).
    assert state.lane_rate("text", 0.8) == 1.0
    assert _refusal(state, 8, 0.8) == 300


def test_retry_after_for_late_work_and_the_soonest_engine() -> None:
    state = BrokerState(("text",), heartbeat_interval_s=1.0, liveness=3)
    slow = state.register(b"s", {**ready(8), "warmup_items_per_s": 4}, 0.0)
    fast = state.register(b"f", {**ready(8), "warmup_items_per_s": 40}, 0.0)
    small = state.register(b"x", {**ready(2), "warmup_items_per_s": 1000}, 0.0)  # can't hold 4
    state.dispatch(slow, 8, 99.0, 0.0)  # 8 / 4 = 2 s
    state.dispatch(fast, 4, 99.0, 0.0)  # 4 / 40 = 0.1 s
    state.dispatch(fast, 4, 99.0, 0.0)  # then 0.2 s
    state.dispatch(small, 2, 99.0, 0.0)
    assert _refusal(state, 4, 0.05) == 50  # the fast engine's first request
    assert _refusal(state, 8, 0.05) == 150  # both of the fast engine's
    # At 3 s everything is late for its announced pace: the missing credits at that pace.
    assert _refusal(state, 8, 3.0) == 200  # 8 / 40 items/s, the fast engine
    assert state.free_in(slow, 8, 3.0) == 2.0 and state.free_in(small, 4, 3.0) is None


@pytest.mark.parametrize("announced", [None, "fast", True, -5.0, 0, float("nan"),
                                       float("inf")])
def test_retry_after_without_rate_or_usable_announcement_is_one_heartbeat(
        announced: object) -> None:
    state = BrokerState(("text",), heartbeat_interval_s=0.25, liveness=3)
    e = state.register(b"a", {**ready(4), "warmup_items_per_s": announced}, 0.0)
    state.dispatch(e, 4, 99.0, 0.0)
    assert _refusal(state, 1, 0.1) == 250


def test_retry_after_is_bounded() -> None:
    state = BrokerState(("text",), heartbeat_interval_s=1.0, liveness=3)
    e = state.register(b"a", {**ready(1000), "warmup_items_per_s": 0.01}, 0.0)
    state.dispatch(e, 1000, 999.0, 0.0)
    assert _refusal(state, 10, 0.0) == 10_000  # 1000 s expected: say 10 s, then ask again
    quick = state.register(b"b", {**ready(4), "warmup_items_per_s": 1e9}, 0.0)
    state.dispatch(quick, 4, 999.0, 0.0)
    assert _refusal(state, 4, 0.0) == 1


def test_bulk_requests_leave_the_reserve_to_interactive_ones() -> None:
    state = BrokerState(("text",), heartbeat_interval_s=1.0, liveness=3, bulk_reserve=0.25)
    e = state.register(b"a", ready(64), 0.0)
    assert state.reserve(e) == 16
    state.dispatch(state.admit("text", 48, 0.0, bulk=True), 48, 10.0, 0.0)
    with pytest.raises(Overloaded) as info:
        state.admit("text", 1, 0.0, bulk=True)  # 16 free, all of them kept
    assert "kept for interactive" in info.value.message and info.value.retry_after > 0
    assert state.admit("text", 16, 0.0) is e  # an interactive request may take them
    with pytest.raises(TooLarge, match="for bulk requests"):
        state.admit("text", 49, 0.0, bulk=True)
    lane = state.lane_info("text", 0.0, 256)
    assert (lane["max_request_items"], lane["bulk_max_request_items"],
            lane["bulk_credits"]) == (64, 48, 48)
    tiny = BrokerState(("text",), bulk_reserve=0.25)
    assert tiny.reserve(tiny.register(b"b", ready(1), 0.0)) == 0  # one credit: none kept
    assert BrokerState(("text",)).reserve(e) == 0  # no reserve: one pool

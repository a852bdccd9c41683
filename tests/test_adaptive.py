"""Adaptive credits without sockets: the AIMD law alone, then inside BrokerState's admission."""

from __future__ import annotations

from typing import Any

import pytest

from zembed.broker.adaptive import AimdLimit, parse_targets
from zembed.broker.state import BrokerState
from zembed.errors import Overloaded


def ready(credits: int = 256, max_batch: int = 32) -> dict[str, Any]:
    return {"lane": "text", "kinds": ["text"], "fingerprint": "fp", "dim": 4,
            "credits": credits, "max_batch": max_batch, "model": "m"}


def test_starts_at_the_announced_credits_and_stays_in_bounds() -> None:
    lim = AimdLimit(0.1, floor=32, ceiling=256, step=32)
    assert lim.limit == 256
    now = 0.0
    for _ in range(50):  # far too slow: cut, once per round trip, down to the floor
        now += 1.0
        lim.sample(5.0, 32, now - 0.5, 200, now)
    assert lim.limit == 32
    for _ in range(500):  # fast and busy: grows back, never past what the engine announced
        now += 0.01
        lim.sample(0.01, 32, now - 0.01, lim.limit, now)
    assert lim.limit == 256


def test_one_cut_per_round_trip() -> None:
    """Requests dispatched before a cut were admitted under the old limit: their lateness
    does not cut again."""
    lim = AimdLimit(0.1, floor=8, ceiling=256, step=32)
    assert lim.sample(0.2, 32, started=1.0, used=200, now=1.2)
    after_first = lim.limit
    for _ in range(20):  # late replies of requests dispatched before the cut at 1.2
        assert not lim.sample(0.3, 32, started=1.1, used=200, now=1.25)
    assert lim.limit == after_first and lim.cuts == 1
    assert lim.sample(0.3, 32, started=1.3, used=100, now=1.6)  # dispatched after: cuts
    assert lim.limit < after_first and lim.cuts == 2


def test_cut_follows_the_lateness_within_bounds() -> None:
    slight = AimdLimit(0.1, floor=1, ceiling=100, step=10)
    slight.sample(0.105, 1, 0.0, 50, 0.2)
    assert slight.limit == 90  # at most 0.9
    far = AimdLimit(0.1, floor=1, ceiling=100, step=10)
    far.sample(1.0, 1, 0.0, 50, 1.0)
    assert far.limit == 50  # at least 0.5
    mid = AimdLimit(0.1, floor=1, ceiling=100, step=10)
    mid.sample(0.16, 1, 0.0, 50, 1.0)
    assert mid.limit == 62  # 100 x 0.1 / 0.16


def test_an_idle_engine_does_not_grow_its_limit() -> None:
    lim = AimdLimit(0.1, floor=8, ceiling=256, step=32, value=64)
    for i in range(100):
        lim.sample(0.01, 1, i, used=0, now=i + 0.01)  # 1 item in flight of 64: not tested
    assert lim.limit == 64


def test_parse_targets() -> None:
    lanes = ("text", "image")
    assert parse_targets((), lanes) == {}
    assert parse_targets(("50",), lanes) == {"text": 0.05, "image": 0.05}
    assert parse_targets(("100", "text=20"), lanes) == {"text": 0.02, "image": 0.1}
    for bad in ("text=abc", "nope=5", "0", "text=-1", "inf"):
        with pytest.raises(ValueError, match="latency target"):
            parse_targets((bad,), lanes)


def adaptive(target_s: float = 0.1, **kw: Any) -> BrokerState:
    return BrokerState(("text",), latency_targets={"text": target_s}, **kw)


def test_admission_honours_the_limit_and_never_the_announced_credits_past() -> None:
    state = adaptive()
    e = state.register(b"a", ready(256, 32), 0.0)
    assert e.control is not None and e.control.limit == 256 and e.withheld == 0
    # A slow engine: its late replies bring the limit down to the floor (its batch).
    now, started = 0.0, 0.0
    for _ in range(10):
        req = state.dispatch(state.admit("text", 32, now), 32, now + 60, now)
        now += 2.0
        state.complete(b"a", req.token, now)
    assert e.control.limit == 32 and e.withheld == 224
    first = state.dispatch(state.admit("text", 30, now), 30, now + 60, now)
    with pytest.raises(Overloaded, match="adaptive limit 32") as refused:
        state.admit("text", 8, now, ticket=0)  # 2 left under the limit, 226 announced free
    state.complete(b"a", first.token, now + 0.01)
    late = state.dispatch(state.admit("text", 8, now + 0.01, ticket=refused.value.ticket), 8,
                          now + 60, now + 0.01)
    state.complete(b"a", late.token, now + 0.02)
    # Fast again, and busy: the limit climbs back to what the engine announced, no further.
    now += 0.01
    for _ in range(400):
        reqs = []
        while True:
            try:
                eng = state.admit("text", 32, now)
            except Overloaded:
                break
            reqs.append(state.dispatch(eng, 32, now + 60, now))
        assert sum(r.n for r in reqs) <= e.control.limit <= 256
        started = now
        now += 0.02
        for r in reqs:
            state.complete(b"a", r.token, now)
    assert e.control.limit == 256 and e.withheld == 0 and started > 0


def test_an_idle_engine_takes_a_request_larger_than_its_limit() -> None:
    state = adaptive()
    e = state.register(b"a", ready(256, 32), 0.0)
    req = state.dispatch(state.admit("text", 32, 0.0), 32, 60, 0.0)
    state.complete(b"a", req.token, 5.0)
    assert e.control is not None and e.control.limit < 200
    big = state.admit("text", 200, 5.0)  # nothing in flight: it goes, or it never would
    state.dispatch(big, 200, 60, 5.0)
    with pytest.raises(Overloaded):
        state.admit("text", 1, 5.0)


def test_bulk_reserve_follows_the_limit() -> None:
    state = adaptive(bulk_reserve=0.25)
    e = state.register(b"a", ready(256, 32), 0.0)
    assert state.reserve(e) == 64
    req = state.dispatch(state.admit("text", 32, 0.0), 32, 60, 0.0)
    state.complete(b"a", req.token, 1.0)  # cut to 128 (x 0.5)
    assert e.control is not None and e.control.limit == 128
    assert state.reserve(e) == 32
    info = state.lane_info("text", 1.0, 256)
    assert info["credits_limit"] == 128 and info["bulk_credits"] == 96
    assert info["latency_target_ms"] == 100.0 and info["max_request_items"] == 256
    view = state.lane_view("text", 1.0)
    assert view["engines"][0]["adaptive"]["limit"] == 128
    assert view["credits_limit"] == 128 and view["latency_target_ms"] == 100.0


def test_fixed_credits_without_a_target() -> None:
    state = BrokerState(("text",))
    e = state.register(b"a", ready(64, 32), 0.0)
    req = state.dispatch(state.admit("text", 32, 0.0), 32, 60, 0.0)
    state.complete(b"a", req.token, 50.0)  # however slow
    assert e.control is None and e.withheld == 0
    assert state.lane_info("text", 50.0, 256)["latency_target_ms"] is None


def test_floor_from_the_broker_option() -> None:
    state = adaptive(adaptive_min_credits=8)
    e = state.register(b"a", ready(64, 32), 0.0)
    assert e.control is not None and e.control.floor == 8

"""Adaptive credits without sockets: the AIMD law alone, then inside BrokerState's admission."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack

from zembed.broker.adaptive import AimdLimit, parse_targets
from zembed.broker.state import BrokerState
from zembed.client import Client
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
    # It starts at two batches, not at the 256 announced, and grows from there.
    assert e.control is not None and e.control.limit == 64 and e.withheld == 192
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
    assert state.reserve(e) == 16  # a quarter of the starting limit, 64
    req = state.dispatch(state.admit("text", 32, 0.0), 32, 60, 0.0)
    state.complete(b"a", req.token, 1.0)  # cut to 32 (x 0.5)
    assert e.control is not None and e.control.limit == 32
    assert state.reserve(e) == 8
    info = state.lane_info("text", 1.0, 256)
    assert info["credits_limit"] == 32 and info["bulk_credits"] == 24
    assert info["latency_target_ms"] == 100.0 and info["max_request_items"] == 256
    view = state.lane_view("text", 1.0)
    assert view["engines"][0]["adaptive"]["limit"] == 32
    assert view["credits_limit"] == 32 and view["latency_target_ms"] == 100.0


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


# -- over real processes: a broker with a latency target and a MiniLM engine ----------------


def _load(stack: Stack, stop: threading.Event, errors: list[BaseException], who: int) -> None:
    """A closed-loop client of 8 distinct texts per request that honours retry_after."""
    with stack.client(timeout=60, retries=None) as c:
        i = 0
        while not stop.is_set():
            try:
                c.embed_texts([f"client {who} request {i} item {k}" for k in range(8)])
            except BaseException as exc:  # the test fails on any error
                errors.append(exc)
                return
            i += 1


def _engine(c: Client) -> dict[str, Any]:
    engine: dict[str, Any] = c.stats(timeout=5)["lanes"]["text"]["engines"][0]
    return engine


def _watch(c: Client, seconds: float, seen: list[dict[str, Any]]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen.append(_engine(c))
        time.sleep(0.1)


def test_adaptive_credits_follow_a_slowed_engine_and_recover(
        stack_factory: Callable[[], Stack], tmp_path: Path) -> None:
    """Slowed (each batch sleeps 3x the target), the limit falls to the floor (the engine's
    batch); fast again, it climbs back; it never passes what the engine announced."""
    delay = tmp_path / "delay-ms"
    delay.write_text("0")
    stack = stack_factory()
    stack.start_broker("--latency-target-ms", "text=200", "--heartbeat-interval-ms", "1000")
    stack.engine = stack.start_text("--credits", "32", "--max-batch", "8",
                                    "--batch-delay-file", str(delay),
                                    "--heartbeat-interval-ms", "1000")
    stack.wait_engines("text", 1)
    stop, errors = threading.Event(), []
    workers = [threading.Thread(target=_load, args=(stack, stop, errors, i)) for i in range(5)]
    slow: list[dict[str, Any]] = []
    fast: list[dict[str, Any]] = []
    with stack.client(timeout=10) as c:
        first = _engine(c)
        assert first["adaptive"]["limit"] == 16 and first["adaptive"]["floor"] == 8
        assert c.info()["lanes"]["text"]["latency_target_ms"] == 200.0
        for w in workers:
            w.start()
        try:
            delay.write_text("600")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not slow or slow[-1]["credits_limit"] > 8):
                _watch(c, 0.5, slow)
            delay.write_text("0")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not fast or fast[-1]["credits_limit"] < 16):
                _watch(c, 0.5, fast)
        finally:
            delay.write_text("0")
            stop.set()
            for w in workers:
                w.join(timeout=60)
    assert not errors, errors[:3]
    assert not any(w.is_alive() for w in workers)
    assert min(e["credits_limit"] for e in slow) == 8, [e["credits_limit"] for e in slow]
    assert slow[-1]["adaptive"]["cuts"] >= 1 and slow[-1]["adaptive"]["late"] > 0
    assert fast[-1]["credits_limit"] >= 16, [e["credits_limit"] for e in fast]
    for e in slow + fast:  # never past what the engine announced
        assert e["credits_limit"] <= e["credits_total"] == 32
        assert e["items_in_flight"] <= 32


def test_retrying_clients_take_turns(stack_factory: Callable[[], Stack]) -> None:
    """Eight clients x 8 items on 16 credits: every request is answered, refused ones come
    back with their tickets and are admitted on them."""
    stack = stack_factory()
    stack.start_broker("--heartbeat-interval-ms", "1000")
    stack.engine = stack.start_text("--credits", "16", "--max-batch", "8",
                                    "--heartbeat-interval-ms", "1000")
    stack.wait_engines("text", 1)
    stop, errors = threading.Event(), []
    workers = [threading.Thread(target=_load, args=(stack, stop, errors, i)) for i in range(8)]
    for w in workers:
        w.start()
    time.sleep(4)
    stop.set()
    for w in workers:
        w.join(timeout=60)
    assert not errors, errors[:3]
    with stack.client(timeout=10) as c:
        lane = c.stats(timeout=5)["lanes"]["text"]
    line = lane["retry_lines"]["interactive"]
    assert lane["classes"]["interactive"]["refused"] > 0
    assert line["served"] > 0, line


def test_a_refusal_under_the_limit_lets_it_grow() -> None:
    """Bulk work kept off the reserve never fills half the limit, yet the limit refuses it."""
    lim = AimdLimit(1.0, floor=8, ceiling=256, step=8, value=64)
    lim.sample(0.01, 16, 0.0, used=0, now=0.01)  # 16 of 64 in use: not wanted
    assert lim.limit == 64
    lim.wanted = True
    lim.sample(0.01, 16, 0.0, used=0, now=0.02)
    assert lim.limit == 66 and not lim.wanted

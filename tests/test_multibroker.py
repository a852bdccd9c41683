"""Clients with several brokers (issue 16, first part): spread over the ones up, fail over.

Two brokers on loopback, each with its own MiniLM engine; one client given both endpoints.
"""

from __future__ import annotations

import asyncio
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import Stack

from zembed.client import AsyncClient, Client
from zembed.client.link import LinkEvents, endpoints


def event(kind: int, endpoint: bytes) -> list[bytes]:
    """A socket monitor message as libzmq writes it (event, value; endpoint)."""
    return [struct.pack("=hi", kind, 0), endpoint]


def test_endpoints_from_a_string_or_a_list() -> None:
    assert endpoints("tcp://a:1") == ["tcp://a:1"]
    assert endpoints(" tcp://a:1, tcp://b:2 ,tcp://a:1") == ["tcp://a:1", "tcp://b:2"]
    assert endpoints(["tcp://a:1", "tcp://b:2,tcp://c:3"]) == ["tcp://a:1", "tcp://b:2",
                                                              "tcp://c:3"]
    for empty in ("", " , ", []):
        with pytest.raises(ValueError, match="no broker endpoint"):
            endpoints(empty)


def test_a_first_connection_is_no_loss_and_a_drop_marks_the_route_down() -> None:
    events = LinkEvents()  # one route's monitor
    assert not events.lost(event(zmq.EVENT_HANDSHAKE_SUCCEEDED, b"tcp://a:1"))
    assert not events.down
    assert events.lost(event(zmq.EVENT_DISCONNECTED, b"tcp://a:1"))
    assert events.down  # not sent on until it is back, even while libzmq still says POLLOUT
    assert events.lost(event(zmq.EVENT_HANDSHAKE_SUCCEEDED, b"tcp://a:1"))  # back: a loss too
    assert not events.down
    assert not events.lost([b"garbage"])
    assert events.connections == 2


def test_heartbeat_period_is_the_clients_to_choose() -> None:
    import zmq.asyncio

    with Client("tcp://127.0.0.1:1,tcp://127.0.0.1:2", heartbeat_ms=250) as c:
        assert c._routes is not None
        for route in c._routes.all:
            assert route.sock.getsockopt(zmq.HEARTBEAT_IVL) == 250
            assert route.sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 750  # 3 silent periods
    with Client("tcp://127.0.0.1:1") as c:  # the default: 1 s, given up after 3 s
        assert c._routes is not None
        assert c._routes.all[0].sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 3000
    for bad in (0, 5, 2.5):
        with pytest.raises(ValueError, match="heartbeat_ms"):
            Client("tcp://127.0.0.1:1", heartbeat_ms=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="heartbeat_ms"):
            AsyncClient("tcp://127.0.0.1:1", heartbeat_ms=bad,  # type: ignore[arg-type]
                        ctx=zmq.asyncio.Context.instance())


@pytest.fixture
def two(stack_factory: Callable[[], Stack]) -> tuple[Stack, Stack]:
    stacks = []
    for _ in range(2):
        stack = stack_factory()
        stack.start_broker("--heartbeat-interval-ms", "1000")
        stack.engine = stack.start_text("--heartbeat-interval-ms", "1000")
        stacks.append(stack)
    for stack in stacks:
        stack.wait_engines("text", 1)
    return stacks[0], stacks[1]


def served(stack: Stack) -> int:
    with stack.client(timeout=5) as c:
        return int(c.stats(timeout=5)["lanes"]["text"]["requests"]["200"])


def test_requests_spread_over_brokers_and_survive_one_dying(two: tuple[Stack, Stack]) -> None:
    a, b = two
    with Client([a.frontend, b.frontend], timeout=30) as c:
        assert c.endpoints == [a.frontend, b.frontend]
        reference = c.embed_texts(["a red running shoe"])
        for i in range(20):
            assert c.embed_texts([f"spread {i}"]).shape == (1, 384)
        assert served(a) >= 5 and served(b) >= 5  # round-robin over both brokers

        async def spread_async() -> None:
            async with AsyncClient(f"{a.frontend},{b.frontend}", timeout=30) as ac:
                for i in range(10):
                    assert (await ac.embed_texts([f"async {i}"])).shape == (1, 384)

        before = served(a), served(b)
        asyncio.run(spread_async())
        assert served(a) >= before[0] + 3 and served(b) >= before[1] + 3
        # Bulk embedding spreads too, sized for both brokers' shares.
        before = served(a), served(b)
        assert c.embed_many([f"bulk {i}" for i in range(200)]).shape == (200, 384)
        assert served(a) > before[0] and served(b) > before[1]
        # Many requests in flight, then one broker is killed: every one is answered once.
        # (48 items: what either broker's engine holds alone, so a resubmission fits.)
        texts = [[f"failover {i} item {k}" for k in range(8)] for i in range(6)]
        pending = [c.submit("text", "text", t) for t in texts]
        on_a = sum(p.route == a.frontend for p in pending)
        assert 1 <= on_a <= 5  # dealt over both
        assert a.broker is not None
        a.broker.signal(signal.SIGKILL)
        results = [c.result(p) for p in pending]
        assert all(r.vectors.shape == (8, 384) for r in results)
        # Exactly the killed broker's share is sent again, to the other (some of it may have
        # been answered before the kill).
        assert 1 <= c.resubmitted <= on_a
        # After the kill, the survivor serves everything, with the same vectors.
        for i in range(10):
            assert c.embed_texts([f"after {i}"]).shape == (1, 384)
        assert np.allclose(c.embed_texts(["a red running shoe"]), reference, atol=1e-2)
    assert served(b) >= 10 + 1


def refused(stack: Stack) -> int:
    with stack.client(timeout=5) as c:
        return int(c.stats(timeout=5)["lanes"]["text"]["requests"].get("429", 0))


def test_a_429_goes_to_another_broker_with_room_before_backing_off(
        stack_factory: Callable[[], Stack], tmp_path: Path) -> None:
    """Broker a's only engine is kept full (8 credits, 3 s a batch): calls that meet its 429
    are served by b at once, not after a's retry estimate."""
    delay = tmp_path / "delay"
    delay.write_text("3000")
    a, b = stack_factory(), stack_factory()
    a.start_broker()
    a.start_text("--credits", "8", "--max-batch", "8", "--batch-delay-file", str(delay))
    b.start_broker()
    b.start_text()
    a.wait_engines("text", 1)
    b.wait_engines("text", 1)
    with Client(a.frontend, timeout=30, retries=0) as filler:
        hold = filler.submit("text", "text", [f"fill {k}" for k in range(8)])
        with Client([a.frontend, b.frontend], timeout=30) as c:
            for i in range(4):
                t0 = time.monotonic()
                assert c.embed_texts([f"elsewhere {i}"]).shape == (1, 384)
                assert time.monotonic() - t0 < 1.5  # not a's batch time: no backoff
        assert filler.result(hold).vectors.shape == (8, 384)
    assert refused(a) >= 1  # round-robin sent at least one call to a first
    assert served(b) == 4


def test_credit_shares_split_evenly_and_never_starve_a_broker() -> None:
    from zembed.engines.runtime import credit_shares

    assert credit_shares(64, 1) == [64]
    assert credit_shares(64, 2) == [32, 32]
    assert credit_shares(64, 3) == [22, 21, 21] and sum(credit_shares(64, 3)) == 64
    assert credit_shares(1, 2) == [1, 1]  # fewer credits than brokers: overcommit, not starve
    assert credit_shares(8, 0) == [8]
    assert endpoints(" tcp://a:1,tcp://b:2,tcp://a:1 ") == ["tcp://a:1", "tcp://b:2"]
    with pytest.raises(ValueError, match="no broker endpoint"):
        endpoints(" , ")


def engine_view(stack: Stack) -> dict[str, object] | None:
    """The text lane's only engine as ``stack``'s broker shows it (None: none registered)."""
    with stack.client(timeout=2) as c:
        engines = c.stats(timeout=2)["lanes"]["text"]["engines"]
    return engines[0] if engines else None


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {what}")


def test_one_engine_serves_two_brokers_and_moves_its_credits_to_the_survivor(
        stack_factory: Callable[[], Stack]) -> None:
    a, b = stack_factory(), stack_factory()
    a.start_broker()
    b.start_broker()
    a.start_text("--broker", f"{a.backend},{b.backend}")  # 64 credits, split 32 + 32
    a.wait_engines("text", 1)
    b.wait_engines("text", 1)

    def credits_are(stack: Stack, n: int, serving: int) -> bool:
        view = engine_view(stack)
        return view is not None and view["credits_total"] == n and view["serving"] == serving

    wait_for(lambda: credits_are(a, 32, 2) and credits_are(b, 32, 2), 10, "a 32/32 split")
    view = engine_view(a)
    assert view is not None and view["brokers"] == [a.backend, b.backend]
    with a.client() as ca, b.client() as cb:
        assert np.allclose(ca.embed_texts(["one engine"]), cb.embed_texts(["one engine"]),
                           atol=1e-2)
        topology = ca.ready()["topology"]
        engine = topology["lanes"]["text"][0]
        assert engine["brokers"] == [a.backend, b.backend] and engine["credits"] == 32
        assert engine["engine_credits"] == 64 and engine["serving"] == 2 and engine["host"]
        assert topology["cache"]["backend"] == "off"
    # Broker b dies: within the engine's liveness (3 x 200 ms) a gets all 64 credits.
    assert b.broker is not None
    b.broker.signal(signal.SIGKILL)
    b.broker.popen.wait(timeout=10)
    wait_for(lambda: credits_are(a, 64, 1), 10, "a takes b's credits")
    with a.client() as ca:
        assert ca.embed_texts([f"after b {k}" for k in range(48)]).shape == (48, 384)
        assert ca.stats()["recredits"] >= 1  # 32 -> 64
    # b comes back on the same ports: the engine re-registers there and the split is even again.
    b.start_broker()
    wait_for(lambda: credits_are(a, 32, 2) and credits_are(b, 32, 2), 30, "the split again")
    with b.client() as cb:
        assert cb.embed_texts(["b is back"]).shape == (1, 384)


def test_the_broker_acknowledges_ready_at_once(stack_factory: Callable[[], Stack]) -> None:
    """A READY is answered with a HEARTBEAT straight away, not a heartbeat interval (1 s)
    later: an engine whose READY arrived late in its liveness period hears in time."""
    import msgpack

    from zembed import protocol as p

    stack = stack_factory()
    stack.start_broker()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(stack.backend)
        with stack.client(timeout=10) as c:
            c.ping()  # the broker is up
        ready = {"version": p.ENGINE_PROTO_VERSION, "lane": "text", "kinds": ["text"],
                 "fingerprint": "fp-ack", "dim": 4, "credits": 4, "max_batch": 4,
                 "heartbeat_ms": 1000}
        t0 = time.monotonic()
        sock.send_multipart([p.ENGINE_PROTO, p.READY, msgpack.packb(ready)])
        assert sock.poll(500, zmq.POLLIN), "no answer to READY within 0.5 s"
        frames = sock.recv_multipart()
        assert frames[:2] == [p.ENGINE_PROTO, p.HEARTBEAT]
        assert time.monotonic() - t0 < 0.5
    finally:
        sock.close(0)

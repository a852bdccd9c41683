"""Both clients ride out a broker that dies mid-call, and never wait past their timeout.

Real broker and engine processes. The engine is frozen (SIGSTOP) while requests are in
flight, so the broker is SIGKILLed with them inside it; a new broker then starts on the same
ports and the engine, thawed, re-registers with it by itself.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from conftest import Proc, Stack

from zembed.client import AsyncClient, Client
from zembed.errors import DeadlineExceeded, EngineUnavailable
from zembed.tools.net import free_port

pytestmark = pytest.mark.slow

#: How long past its timeout a call may return: scheduling slack, not a grace period.
SLACK_S = 0.5


def crash_and_restart(stack: Stack, engine: Proc, down_s: float = 1.0) -> None:
    """With the engine frozen (by the caller): SIGKILL the broker with work inside, bring a new
    one up after ``down_s``, thaw the engine (it finds it is unknown and re-registers)."""
    assert stack.broker is not None
    try:
        time.sleep(0.3)  # the calls are in flight, held by the frozen engine
        stack.broker.signal(signal.SIGKILL)
        stack.broker.popen.wait(5)
        time.sleep(down_s)
        stack.start_broker()
    finally:
        engine.signal(signal.SIGCONT)


@pytest.fixture
def stack(stack_factory: Callable[[], Stack]) -> tuple[Stack, Proc]:
    s = stack_factory()
    s.start_broker()
    engine = s.start_text()
    s.wait_engines("text", 1)
    return s, engine


def test_sync_call_survives_a_broker_crash_and_restart(stack: tuple[Stack, Proc]) -> None:
    s, engine = stack
    timeout = 15.0
    # retries: the resubmitted request may reach the new broker before the engine has
    # re-registered with it (503 "no engine"), which the retries ride out.
    with Client(s.frontend, timeout=timeout, retries=5) as c:
        assert c.embed_texts(["warm"]).shape == (1, 384)
        restart = threading.Thread(target=crash_and_restart, args=(s, engine))
        engine.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        restart.start()
        try:
            vectors = c.embed_texts([f"in flight {i}" for i in range(4)])
        finally:
            restart.join(30)
        took = time.monotonic() - t0
    assert vectors.shape == (4, 384)
    assert took < timeout
    assert c.resubmitted >= 1  # the lost request was sent again


def test_async_call_survives_a_broker_crash_and_restart(stack: tuple[Stack, Proc]) -> None:
    s, engine = stack
    timeout = 15.0

    async def main() -> tuple[list[Any], int, float]:
        async with AsyncClient(s.frontend, timeout=timeout, retries=5) as c:
            await c.embed_texts(["warm"])
            engine.signal(signal.SIGSTOP)
            t0 = time.monotonic()
            calls = [asyncio.ensure_future(c.embed_texts([f"in flight {i}"])) for i in range(4)]
            await asyncio.sleep(0.05)
            await asyncio.to_thread(crash_and_restart, s, engine)
            vectors = await asyncio.gather(*calls)
            return vectors, c.resubmitted, time.monotonic() - t0

    vectors, resubmitted, took = asyncio.run(main())
    assert all(v.shape == (1, 384) for v in vectors)
    assert resubmitted >= 4 and took < timeout


def test_sync_call_fails_by_its_timeout_when_the_broker_stays_down(
    stack: tuple[Stack, Proc],
) -> None:
    s, engine = stack
    assert s.broker is not None
    with Client(s.frontend, timeout=2.0) as c:
        c.embed_texts(["warm"])
        engine.signal(signal.SIGSTOP)
        try:
            pending = c.submit("text", "text", ["lost"])
            time.sleep(0.2)
            s.broker.signal(signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(EngineUnavailable, match="lost with the request in flight"):
                c.result(pending)
            assert time.monotonic() - t0 < 2.0 + SLACK_S
        finally:
            engine.signal(signal.SIGCONT)


def test_async_call_fails_by_its_timeout_when_the_broker_stays_down(
    stack: tuple[Stack, Proc],
) -> None:
    s, engine = stack
    assert s.broker is not None
    broker = s.broker

    async def main() -> float:
        async with AsyncClient(s.frontend, timeout=2.0) as c:
            await c.embed_texts(["warm"])
            engine.signal(signal.SIGSTOP)
            call = asyncio.ensure_future(c.embed_texts(["lost"]))
            await asyncio.sleep(0.2)
            broker.signal(signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(EngineUnavailable, match="lost with the request in flight"):
                await call
            return time.monotonic() - t0

    try:
        took = asyncio.run(main())
    finally:
        engine.signal(signal.SIGCONT)
    assert took < 2.0 + SLACK_S


def test_async_call_fails_by_its_timeout_and_leaves_no_unretrieved_future(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No broker at all: EngineUnavailable at the timeout, and nothing printed about futures."""

    async def main() -> float:
        async with AsyncClient(f"tcp://127.0.0.1:{free_port()}", timeout=0.5,
                               retries=3) as c:
            t0 = time.monotonic()
            for _ in range(3):
                with pytest.raises(EngineUnavailable):
                    await c.embed_texts(["anyone?"])
            return (time.monotonic() - t0) / 3

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        per_call = asyncio.run(main())
        gc.collect()
    assert per_call < 0.5 + SLACK_S
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_silent_broker_gives_deadline_exceeded_at_the_timeout_not_after(
    stack: tuple[Stack, Proc],
) -> None:
    """A frozen broker (connection up, nobody answering): the caller's timeout, not later."""
    s, _ = stack
    assert s.broker is not None
    timeout = 1.0

    with Client(s.frontend, timeout=timeout, retries=3) as c:
        c.ping()
        s.broker.signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                c.embed_texts(["hello?"])
            took_sync = time.monotonic() - t0
        finally:
            s.broker.signal(signal.SIGCONT)

    async def main() -> float:
        async with AsyncClient(s.frontend, timeout=timeout, retries=3) as c:
            await c.ping()
            assert s.broker is not None
            s.broker.signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(DeadlineExceeded):
                    await c.embed_texts(["hello?"])
                return time.monotonic() - t0
            finally:
                s.broker.signal(signal.SIGCONT)

    took_async = asyncio.run(main())
    for took in (took_sync, took_async):
        assert timeout - 0.05 <= took < timeout + SLACK_S


def test_clients_created_and_closed_in_quick_succession_never_collide() -> None:
    """Each client's connection monitor has an address of its own (CI once hit EADDRINUSE
    when a new client reused a just-closed socket's file descriptor)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    for _ in range(300):
        Client(endpoint, timeout=0.1).close()

    async def many() -> None:
        for _ in range(100):
            await AsyncClient(endpoint, timeout=0.1).close()

    asyncio.run(many())


def test_a_message_without_status_is_not_taken_for_a_reply() -> None:
    from zembed.client.codec import embed_frames, reply_id

    request = embed_frames(7, "text", "text", ["x"], normalize=True, dtype="f32",
                           timeout_s=1.0, input_type=None)
    assert reply_id(request) == (None, {})  # our own request, echoed, is not an answer
    answer = [request[0], msgpack.packb({"id": 7, "status": 503, "error": "e"}), b""]
    assert reply_id(answer)[0] == 7

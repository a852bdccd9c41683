"""Overload, deadlines, dead engines and restarts, over real processes.

Engines are frozen with SIGSTOP to hold their credits deterministically: a stopped engine has
accepted work (the broker spent the credits) but answers nothing until SIGCONT.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import Stack, wait_until

from zembed.client import Client
from zembed.errors import DeadlineExceeded, EngineUnavailable, Overloaded


@pytest.fixture
def small_stack(stack_factory: Callable[[], Stack]) -> Stack:
    """One engine with 4 credits; 1 s heartbeats so a short SIGSTOP is not a death."""
    stack = stack_factory()
    stack.start_broker("--heartbeat-interval-ms", "1000")
    stack.engine = stack.start_text("--credits", "4", "--max-batch", "4",
                                    "--heartbeat-interval-ms", "1000")
    stack.wait_engines("text", 1)
    return stack


def test_out_of_credits_is_429_at_once(small_stack: Stack, record_property: Any) -> None:
    engine = small_stack.engine
    assert engine is not None
    with small_stack.client() as c:
        engine.signal(signal.SIGSTOP)
        try:
            held = c.submit("text", "text", ["a", "b", "c", "d"])  # takes all 4 credits
            time.sleep(0.05)
            t0 = time.perf_counter()
            with pytest.raises(Overloaded) as info:
                c.embed_texts(["one too many"])
            reject_ms = (time.perf_counter() - t0) * 1000
        finally:
            engine.signal(signal.SIGCONT)
        record_property("time_to_429_ms", round(reject_ms, 3))
        print(f"time to 429: {reject_ms:.2f} ms")
        assert info.value.status == 429 and info.value.retry_after > 0
        assert c.result(held).vectors.shape == (4, 384)  # the held request still completes
        lane = c.stats()["lanes"]["text"]
        assert lane["requests"]["429"] == 1 and lane["items"]["429"] == 1
        assert lane["requests"]["200"] == 1


def test_client_retry_honours_retry_after(small_stack: Stack) -> None:
    engine = small_stack.engine
    assert engine is not None
    with small_stack.client(retries=50, backoff=0.02) as c:
        engine.signal(signal.SIGSTOP)
        try:
            held = c.submit("text", "text", ["a", "b", "c", "d"])
            time.sleep(0.05)
            retried = c.submit("text", "text", ["retried"])
            with pytest.raises(Overloaded) as info:
                c.result(retried)  # submit/result never retry: the refusal shows
            assert info.value.retry_after > 0
        finally:
            threading.Timer(0.5, engine.signal, args=(signal.SIGCONT,)).start()
        t0 = time.monotonic()
        v = c.embed_texts(["retried"])  # embed() retries 429s until the credits come back
        assert v.shape == (1, 384) and time.monotonic() - t0 >= 0.3
        assert c.result(held).vectors.shape == (4, 384)
        assert c.stats()["lanes"]["text"]["requests"]["429"] >= 2


def test_deadline_is_504_and_the_credit_returns_later(small_stack: Stack) -> None:
    engine = small_stack.engine
    assert engine is not None
    with small_stack.client() as c:
        engine.signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="while the engine"):
                c.embed_texts(["slow"], timeout=0.3)  # answered by the broker, not the client
            assert time.monotonic() - t0 < 0.3 + 0.4
            lane = c.stats()["lanes"]["text"]
            assert lane["credits_free"] == 3  # credit still held by the stopped engine
        finally:
            engine.signal(signal.SIGCONT)
        wait_until(lambda: c.stats()["lanes"]["text"]["credits_free"] == 4)
        assert c.stats()["lanes"]["text"]["requests"]["504"] == 1
        assert c.embed_texts(["fast again"]).shape == (1, 384)


def test_engine_killed_in_flight_gets_503_then_a_new_engine_serves(
    stack_factory: Callable[[], Stack],
) -> None:
    stack = stack_factory()
    broker = stack.start_broker()
    first = stack.start_text()
    second = stack.start_text()
    stack.wait_engines("text", 2)
    with stack.client(timeout=20) as c:
        # Both engines take work: the broker picks the one with the most free credits.
        pending = [c.submit("text", "text", [f"sentence {i}"] * 16) for i in range(8)]
        for pnd in pending:
            assert c.result(pnd).vectors.shape == (16, 384)
        done = [e["requests_done"] for e in c.stats()["lanes"]["text"]["engines"]]
        assert len(done) == 2 and min(done) > 0

        first.signal(signal.SIGSTOP)
        second.signal(signal.SIGSTOP)
        in_flight = [c.submit("text", "text", [f"lost {i}"]) for i in range(6)]
        time.sleep(0.1)
        t0 = time.monotonic()
        first.signal(signal.SIGKILL)
        second.signal(signal.SIGKILL)
        for pnd in in_flight:
            with pytest.raises(EngineUnavailable):
                c.result(pnd)
        # 200 ms heartbeats: dead within 3 intervals, far below the 20 s request deadline.
        assert time.monotonic() - t0 < 3.0
        with pytest.raises(EngineUnavailable):
            c.embed_texts(["nobody home"])
        assert c.ready()["ready"] is False

        stack.start_text()
        stack.wait_engines("text", 1)
        assert c.embed_texts(["back in service"]).shape == (1, 384)
        assert broker.alive()
        assert c.stats()["lanes"]["text"]["engines_lost"] == 2


def test_engines_rejoin_a_restarted_broker(stack_factory: Callable[[], Stack]) -> None:
    stack = stack_factory()
    broker = stack.start_broker()
    stack.start_text()
    stack.wait_engines("text", 1)
    with stack.client(timeout=2, retries=0) as c:
        before = c.embed_texts(["same input"])
        broker.signal(signal.SIGKILL)
        broker.popen.wait(5)
        with pytest.raises((DeadlineExceeded, EngineUnavailable)):
            c.embed_texts(["broker is down"], timeout=0.5)
        stack.start_broker()
        stack.wait_engines("text", 1, timeout=20)
        after = c.embed_texts(["same input"])  # same client object, no re-creation
        assert np.array_equal(before, after)


def test_no_engine_is_503_and_not_ready(stack_factory: Callable[[], Stack]) -> None:
    stack = stack_factory()
    stack.start_broker()
    with stack.client(timeout=2) as c:
        c.ping()
        with pytest.raises(EngineUnavailable):
            c.embed_texts(["x"])
        ready = c.ready()
        assert ready["ready"] is False and ready["missing"] == ["text"]
    probe = subprocess.run([sys.executable, "-m", "zembed", "ready", "--endpoint",
                            stack.frontend], capture_output=True, timeout=30)
    assert probe.returncode == 1
    assert b"text" in probe.stdout
    health = subprocess.run([sys.executable, "-m", "zembed", "health", "--endpoint",
                             stack.frontend], capture_output=True, timeout=30)
    assert health.returncode == 0


def test_probe_fails_when_no_broker_answers() -> None:
    from conftest import free_port

    probe = subprocess.run([sys.executable, "-m", "zembed", "health", "--endpoint",
                            f"tcp://127.0.0.1:{free_port()}", "--timeout-s", "0.5"],
                           capture_output=True, timeout=30)
    assert probe.returncode == 1


def test_client_timeout_never_hangs_without_broker() -> None:
    from conftest import free_port

    with Client(f"tcp://127.0.0.1:{free_port()}", timeout=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises((EngineUnavailable, DeadlineExceeded)):
            c.embed_texts(["anyone?"])
        assert time.monotonic() - t0 < 2.0

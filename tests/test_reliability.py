"""Faults the broker must ride out: stalled engines, broker restarts, vanishing clients.

Each test runs real processes and is bounded in time (engine kills under load, Redis restarts
and the counted soak live in test_faults.py, test_cache.py and test_soak.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import Stack, wait_until

from zembed import protocol as p
from zembed.errors import DeadlineExceeded, EngineUnavailable

LONG = "word " * 400  # truncated to the model's 256 tokens: the costliest text there is


def test_stalled_inference_is_declared_dead_and_its_requests_answered(
    stack_factory: Callable[[], Stack],
) -> None:
    """A forward pass stuck past stall_timeout_s: heartbeats stop, the broker answers 503."""
    stack = stack_factory()
    broker = stack.start_broker()
    stack.start_text("--stall-timeout-s", "0.2", "--credits", "256")  # 256 long texts: seconds
    stack.wait_engines("text", 1)
    with stack.client(timeout=60, retries=0) as c:
        stuck = c.submit("text", "text", [f"{LONG} {i}" for i in range(256)])
        t0 = time.monotonic()
        with pytest.raises(EngineUnavailable):
            c.result(stuck)
        assert time.monotonic() - t0 < 30  # answered by the broker, not by the deadline
        assert c.stats()["lanes"]["text"]["engines_lost"] >= 1
        # The engine finishes, hears it is unknown, re-registers by itself and serves again.
        stack.wait_engines("text", 1, timeout=120)
        assert c.embed_texts(["served again"]).shape == (1, 384)
    assert broker.alive()


def test_broker_restarted_under_load(stack_factory: Callable[[], Stack]) -> None:
    """In-flight requests get a clean typed error; the same client works once the broker is back."""
    stack = stack_factory()
    broker = stack.start_broker("--heartbeat-interval-ms", "1000")
    engine = stack.start_text("--heartbeat-interval-ms", "1000")
    stack.wait_engines("text", 1)
    with stack.client(timeout=3, retries=0) as c:
        assert c.embed_texts(["before"]).shape == (1, 384)
        engine.signal(signal.SIGSTOP)  # hold the next requests in flight
        try:
            in_flight = [c.submit("text", "text", [f"in flight {i}"]) for i in range(8)]
            time.sleep(0.2)
            broker.signal(signal.SIGKILL)
            broker.popen.wait(5)
            for pnd in in_flight:
                with pytest.raises((DeadlineExceeded, EngineUnavailable)):
                    c.result(pnd)
        finally:
            engine.signal(signal.SIGCONT)
        stack.start_broker("--heartbeat-interval-ms", "1000")
        stack.wait_engines("text", 1, timeout=30)  # the engine re-registered by itself
        assert c.embed_texts(["after"]).shape == (1, 384)  # same client object


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_vanished_clients_leak_nothing(stack_factory: Callable[[], Stack],
                                       zctx: zmq.Context[Any]) -> None:
    """Clients that send and disappear: replies dropped, in-flight table and memory back to base."""
    stack = stack_factory()
    broker = stack.start_broker()
    stack.start_text()
    stack.wait_engines("text", 1)

    def vanish(rounds: int) -> None:
        for r in range(rounds):
            sock = zctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 2000)  # the requests still leave; the socket is gone
            sock.connect(stack.frontend)
            for i in range(4):
                header = {"op": "embed", "id": i + 1, "lane": "text", "n": 2}
                sock.send_multipart([p.CLIENT_PROTO, msgpack.packb(header),
                                     msgpack.packb([f"gone {r} {i}", f"away {r} {i}"])])
            sock.close()  # before any answer

    with stack.client(timeout=10) as c:
        def settled() -> bool:
            s = c.stats()
            return s["in_flight"] == 0 and s["lanes"]["text"]["credits_free"] == 64

        vanish(20)  # warm the allocator, socket buffers and counters first
        wait_until(settled, 60)
        base = _rss_kib(broker.popen.pid)
        def answered() -> int:  # 200s, and 429s when the vanishing clients outran the credits
            return sum(c.stats()["lanes"]["text"]["requests"].values())

        before = answered()
        vanish(100)
        wait_until(lambda: answered() - before == 400 and settled(), 120)  # all answered, then
        after = _rss_kib(broker.popen.pid)  # dropped at the ROUTER: nobody to take them
        assert after < base * 1.10 + 2048, (base, after)
        assert c.embed_texts(["still serving"]).shape == (1, 384)

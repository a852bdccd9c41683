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
    """Clients gone mid-request: replies dropped, in-flight table and memory back to base."""
    stack = stack_factory()
    broker = stack.start_broker("--heartbeat-interval-ms", "1000")
    engine = stack.start_text("--heartbeat-interval-ms", "1000")  # 64 credits
    stack.wait_engines("text", 1)

    with stack.client(timeout=10) as c:
        def lane() -> dict[str, Any]:
            return dict(c.stats()["lanes"]["text"])

        def vanish_mid_request(clients: int) -> None:
            """Each client sends one 2-item request while the engine is frozen, then leaves."""
            engine.signal(signal.SIGSTOP)
            try:
                socks = []
                for i in range(clients):
                    sock = zctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(stack.frontend)
                    header = {"op": "embed", "id": i + 1, "lane": "text", "n": 2}
                    sock.send_multipart([p.CLIENT_PROTO, msgpack.packb(header),
                                         msgpack.packb([f"gone {i} {time.monotonic()}",
                                                        f"away {i}"])])
                    socks.append(sock)
                # All of them are in flight at the engine (the broker spent their credits)...
                wait_until(lambda: lane()["credits_free"] == 64 - 2 * clients, 30)
                for sock in socks:  # ...when their clients disappear.
                    sock.close()
            finally:
                engine.signal(signal.SIGCONT)
            wait_until(lambda: c.stats()["in_flight"] == 0 and lane()["credits_free"] == 64, 60)

        vanish_mid_request(30)  # warm the allocator, socket buffers and counters first
        base = _rss_kib(broker.popen.pid)
        gone_before = c.stats()["counters"]["client_gone"]
        ok_before = lane()["requests"]["200"]
        for _ in range(5):
            vanish_mid_request(30)
        stats = c.stats()
        assert lane()["requests"]["200"] - ok_before == 150  # computed and answered...
        assert stats["counters"]["client_gone"] - gone_before == 150  # ...into the void
        assert stats["in_flight"] == 0
        after = _rss_kib(broker.popen.pid)
        assert after < base * 1.10 + 2048, (base, after)
        assert c.embed_texts(["still serving"]).shape == (1, 384)


def test_redis_killed_and_restarted_under_load_fails_no_request(
    stack_factory: Callable[[], Stack], redis_server: Any,
) -> None:
    """Half the load is repeats (cache hits); Redis dies and returns mid-run; nothing fails."""
    import threading

    from zembed.tools.bench import Bench, BenchSpec

    stack = stack_factory()
    stack.start_broker("--cache", redis_server.url, "--heartbeat-interval-ms", "1000")
    stack.start_text("--heartbeat-interval-ms", "1000")
    stack.wait_engines("text", 1)
    bench = Bench(stack.frontend, BenchSpec(items=1, concurrency=8, duration_s=12, repeat=0.5,
                                            timeout_s=20), progress=False)
    runner = threading.Thread(target=bench.run)
    runner.start()
    time.sleep(3)
    redis_server.kill()
    time.sleep(3)
    redis_server.start()
    runner.join(60)
    assert not runner.is_alive()
    s = bench.report.summary()
    assert s["sent"] == s["answered"] == s["ok"] > 0, s  # no 429, no 5xx, no lost request
    assert s["cache_hit_ratio"] > 0  # the cache was really in play
    with stack.client() as c:
        assert c.stats()["cache"]["errors"] > 0  # and really went away for a while

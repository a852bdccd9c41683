"""Observability against a live broker and real engines: the stats socket, the exporter, the
dashboard's scriptable mode, and the health and readiness probes.

Every receive has a timeout (snapshots via :func:`snapshot_after`, HTTP via urllib's), so a
broken broker fails these tests instead of hanging them.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import RedisServer, Stack, free_port, scrape_metrics, wait_until

from zembed.client import Client
from zembed.errors import Overloaded, TooLarge, ZembedError
from zembed.tools.statsource import Subscriber

ZEMBED = [sys.executable, "-m", "zembed"]
INTERVAL = "0.1"  # stats interval of the test brokers, s


def snapshot_after(sub: Subscriber, timeout: float = 10.0) -> dict[str, Any]:
    """A snapshot the broker built after this call (two newer than the first one read)."""
    deadline = time.monotonic() + timeout
    first: int | None = None
    while True:
        snap = sub.next(timeout_s=max(0.0, deadline - time.monotonic()))
        if snap is None:
            pytest.fail(f"no fresh snapshot from {sub.where} within {timeout}s")
        if first is None:
            first = snap["seq"]
        elif snap["seq"] >= first + 2:
            return snap


def delta(before: dict[str, Any], after: dict[str, Any], *path: str) -> int:
    a, b = after, before
    for key in path:
        a, b = a[key], b.get(key, 0) if isinstance(b, dict) else 0
    return int(a) - int(b)


@pytest.fixture(scope="module")
def stats_stack() -> Iterator[Stack]:
    """Broker (memory cache, fast snapshots) and one text engine with 4 credits.

    1 s heartbeats, so that holding the engine with a short SIGSTOP is not a death.
    """
    from conftest import new_stack

    stack = new_stack()
    try:
        stack.start_broker("--cache", "memory", "--stats-interval-s", INTERVAL,
                           "--heartbeat-interval-ms", "1000")
        stack.engine = stack.start_text("--credits", "4", "--max-batch", "4",
                                        "--heartbeat-interval-ms", "1000")
        stack.wait_engines("text", 1)
        yield stack
    finally:
        stack.close()


@pytest.fixture
def sub(stats_stack: Stack) -> Iterator[Subscriber]:
    s = Subscriber(stats_stack.stats, zmq.Context.instance())
    yield s
    s.close()


def test_counters_move_by_exactly_the_traffic(stats_stack: Stack, sub: Subscriber) -> None:
    engine = stats_stack.engine
    assert engine is not None
    tag = str(time.monotonic_ns())
    with stats_stack.client() as c:
        before_op = c.stats()
        before = snapshot_after(sub)
        c.embed_texts([f"a {tag}", f"b {tag}"])  # 200, 2 misses
        c.embed_texts([f"a {tag}", f"b {tag}", f"c {tag}"])  # 200, 2 hits + 1 miss
        c.embed_texts([f"a {tag}"])  # 200, all hit: no engine
        with pytest.raises(TooLarge):
            c.embed_texts(["x" * 70_000])  # 413, 1 item
        engine.signal(signal.SIGSTOP)
        try:
            held = c.submit("text", "text", [f"{i} {tag}" for i in range(4)])  # all 4 credits
            time.sleep(0.05)
            for _ in range(3):
                with pytest.raises(Overloaded):
                    c.embed_texts([f"one too many {tag}", f"two {tag}"])  # 429, 2 items
        finally:
            engine.signal(signal.SIGCONT)
        c.result(held)  # 200, 4 misses
        after_op = c.stats()
        assert after_op["broker"]["connected_clients"] >= 1  # this client
    after = snapshot_after(sub)
    for b, a in ((before_op, after_op), (before, after)):  # the op and the socket agree
        lane = ("lanes", "text")
        assert delta(b, a, *lane, "requests", "200") == 4
        assert delta(b, a, *lane, "items", "200") == 2 + 3 + 1 + 4
        assert delta(b, a, *lane, "requests", "413") == 1
        assert delta(b, a, *lane, "requests", "429") == 3
        assert delta(b, a, *lane, "items", "429") == 6
        assert delta(b, a, *lane, "cache_hits", "text") == 3
        assert delta(b, a, *lane, "cache_misses", "text") == 2 + 1 + 4 + 6
        assert delta(b, a, *lane, "latency_hist", "count") == 4
        assert delta(b, a, *lane, "reject_hist", "count") == 3
        assert delta(b, a, *lane, "items_dispatched") == 2 + 1 + 4
        assert delta(b, a, *lane, "bytes_in") > 70_000
        assert delta(b, a, *lane, "bytes_out") >= (2 + 3 + 1 + 4) * 384 * 4
    lane = after["lanes"]["text"]
    assert lane["latency_hist"]["counts"][-1] == lane["latency_hist"]["count"]
    assert lane["latency_ms"]["p50"] <= lane["latency_ms"]["p99"]
    assert lane["reject_ms"]["window"] >= 3
    engine_view = lane["engines"][0]
    assert engine_view["alive"] and engine_view["batches"] >= 1
    assert engine_view["mean_batch_size"] >= 1 and engine_view["random_weights"] is False
    assert after["broker"]["ready"] is True
    assert after["cache"]["backend"] == "memory" and after["seq"] > before["seq"]


def test_exporter_serves_the_documented_names(stats_stack: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    proc = subprocess.Popen([*ZEMBED, "exporter", "--port", str(port), "--stats-endpoint",
                             stats_stack.stats], stderr=subprocess.PIPE)
    try:
        with stats_stack.client() as c:
            c.embed_texts(["exported"])
            sent = c.stats()["lanes"]["text"]["requests"]["200"]
        text = scrape_metrics(port)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        assert proc.returncode == 0  # SIGTERM is a clean stop
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    names = {name for name, _ in samples}
    doc = (Path(__file__).parent.parent / "docs" / "stats.md").read_text(encoding="utf-8")
    documented = {line.split("`")[1] for line in doc.splitlines()
                  if line.startswith("| `zembed_")}
    for name in ("zembed_requests_total", "zembed_request_duration_seconds_bucket",
                 "zembed_request_duration_seconds_count", "zembed_cache_hits_total",
                 "zembed_engine_credits", "zembed_ready", "zembed_loop_busy_ratio",
                 "zembed_reject_duration_seconds_bucket", "zembed_engine_batches_total"):
        assert name in names, name
    # Every exposed series is documented (a histogram's under its base name).
    undocumented = sorted(n for n in names if n not in documented and not any(
        n.endswith(s) and n.removesuffix(s) in documented for s in ("_bucket", "_count", "_sum")))
    assert not undocumented
    assert samples[("zembed_requests_total", (("lane", "text"), ("status", "200")))] >= sent
    inf = samples[("zembed_request_duration_seconds_bucket", (("lane", "text"), ("le", "+Inf")))]
    assert inf == samples[("zembed_request_duration_seconds_count", (("lane", "text"),))]


def test_stalled_subscriber_does_not_slow_request_handling(
        stack_factory: Callable[[], Stack]) -> None:
    # Snapshots every 2 ms overflow the kernel buffers and the PUB queue of a subscriber that
    # never reads within a second or so, which the traffic outlasts several times.
    stack = stack_factory()
    stack.start_broker("--cache", "memory", "--stats-interval-s", "0.002")
    stack.start_text("--credits", "4")
    stack.wait_engines("text", 1)
    ctx = zmq.Context.instance()
    sub = Subscriber(stack.stats, ctx)
    stalled = ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.connect(stack.stats)
    try:
        with stack.client() as c:
            c.embed_texts(["same cached text"])
            first = snapshot_after(sub)
            t0 = time.monotonic()
            rounds = 0
            while rounds < 40 or time.monotonic() - t0 < 6:  # never reads the stalled socket
                pending = [c.submit("text", "text", [f"stall {rounds} {j}"]) for j in range(4)]
                pending += [c.submit("text", "text", ["same cached text"]) for _ in range(4)]
                for p in pending:
                    # 4 credits: a refusal is the broker doing its job, not a stall.
                    with contextlib.suppress(Overloaded):
                        assert c.result(p).vectors.shape == (1, 384)
                rounds += 1
                assert time.monotonic() - t0 < 60  # a hang guard, not a benchmark
        took = time.monotonic() - t0
        last = snapshot_after(sub)
        seen = []  # what the stalled subscriber got, read only now, up to ``last``
        read_until = time.monotonic() + 10
        while (not seen or seen[-1] < last["seq"]) and time.monotonic() < read_until:
            if stalled.poll(1000):
                seen.append(msgpack.unpackb(stalled.recv(), raw=False)["seq"])
    finally:
        stalled.close(linger=0)
        sub.close()
    lane, before = last["lanes"]["text"], first["lanes"]["text"]
    answered = delta(before, lane, "requests", "200") + delta(before, lane, "requests", "429")
    assert answered == rounds * 8
    assert delta(before, lane, "requests", "200") >= rounds * 4  # the cached half always hits
    assert seen and seen[-1] >= last["seq"]  # it gets the news again once it reads...
    published = seen[-1] - seen[0] + 1
    assert len(seen) < published / 2, "the test did not stall the subscriber for long"
    print(f"stalled subscriber got {len(seen)} of {published} snapshots; "
          f"{rounds * 8} requests took {took:.2f} s")


def test_dashboard_once_json_and_table(stats_stack: Stack) -> None:
    where = ["--stats-endpoint", stats_stack.stats, "--timeout-s", "10"]
    out = subprocess.run([*ZEMBED, "stats", "--once", "--json", *where], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["schema"] == 1 and "text" in snap["lanes"]
    table = subprocess.run([*ZEMBED, "stats", "--once", *where], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "REQ/S" in table.stdout and "text" in table.stdout and "ready" in table.stdout
    polled = subprocess.run([*ZEMBED, "stats", "--once", "--json", "--poll", "--endpoint",
                             stats_stack.frontend], capture_output=True, text=True, timeout=60)
    assert polled.returncode == 0 and json.loads(polled.stdout)["lanes"]["text"]["engines"]
    silent = subprocess.run([*ZEMBED, "stats", "--once", "--stats-endpoint",
                             f"tcp://127.0.0.1:{free_port()}", "--timeout-s", "0.5"],
                            capture_output=True, text=True, timeout=60)
    assert silent.returncode == 1 and "no snapshot" in silent.stderr


def probe(op: str, stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZEMBED, op, "--endpoint", stack.frontend, *args],
                          capture_output=True, text=True, timeout=60)


def is_ready(c: Client) -> bool:
    return bool(c.ready(timeout=2).get("ready"))


def test_ready_flips_with_the_only_text_engine(stack_factory: Callable[[], Stack]) -> None:
    stack = stack_factory()
    stack.start_broker("--stats-interval-s", INTERVAL)
    engine = stack.start_text()
    stack.wait_engines("text", 1)
    sub = Subscriber(stack.stats, zmq.Context.instance())
    try:
        with stack.client() as c:
            wait_until(lambda: is_ready(c))
            assert probe("ready", stack).returncode == 0
            engine.signal(signal.SIGKILL)
            wait_until(lambda: not is_ready(c))
            out = probe("ready", stack)
            assert out.returncode == 1 and "lane text" in out.stderr
            assert json.loads(out.stdout)["missing"] == ["text"]
            assert snapshot_after(sub)["broker"]["missing"] == ["text"]
            stack.start_text()
            wait_until(lambda: is_ready(c), 90)
            assert probe("ready", stack).returncode == 0
            assert snapshot_after(sub)["broker"]["ready"] is True
    finally:
        sub.close()


def test_ready_needs_the_cache(stack_factory: Callable[[], Stack],
                               redis_server: RedisServer) -> None:
    stack = stack_factory()
    stack.start_broker("--cache", redis_server.url)
    stack.start_text()
    stack.wait_engines("text", 1)
    with stack.client() as c:
        wait_until(lambda: is_ready(c))
        redis_server.kill()
        wait_until(lambda: not is_ready(c))  # no traffic needed: the broker probes Redis
        answer = c.ready()
        assert answer["missing"] == ["cache"] and "cache" in answer["reasons"][0]
        assert c.embed_texts(["still served"]).shape == (1, 384)  # not ready, yet serving
        lane = c.stats()["lanes"]["text"]
        assert lane["cache_errors"]["text"] >= 1 and lane["cache_misses"]["text"] >= 1
        redis_server.start()
        wait_until(lambda: is_ready(c), 20)


def answers(c: Client) -> bool:
    try:
        return bool(c.ping(timeout=1))
    except ZembedError:
        return False


def test_health_fails_while_the_broker_loop_is_stuck(stack_factory: Callable[[], Stack]) -> None:
    stack = stack_factory()
    broker = stack.start_broker()
    with stack.client() as c:
        wait_until(lambda: answers(c))
        health = c.health()
        assert health["status"] == "ok" and health["loop"]["turns"] > 0
    assert probe("health", stack, "--timeout-s", "2").returncode == 0
    broker.signal(signal.SIGSTOP)  # the loop makes no progress at all
    try:
        stuck = probe("health", stack, "--timeout-s", "0.5")
    finally:
        broker.signal(signal.SIGCONT)
    assert stuck.returncode == 1 and stuck.stderr.startswith("health: ")
    assert probe("health", stack, "--timeout-s", "5").returncode == 0


def test_stats_socket_takes_curve_keys_when_the_broker_does(stack_factory: Callable[[], Stack],
                                                            tmp_path: Path) -> None:
    from zembed.security import keygen

    broker_key, broker_secret = keygen(tmp_path, "broker")
    client_key, client_secret = keygen(tmp_path, "client")
    engine_key, _ = keygen(tmp_path, "engine")  # one key on both sockets: refused at start
    for role, key in (("clients", client_key), ("engines", engine_key)):
        (tmp_path / role).mkdir()
        (tmp_path / role / key.name).write_bytes(key.read_bytes())
    stack = stack_factory()
    stack.start_broker("--stats-interval-s", INTERVAL, "--curve-secret-key", str(broker_secret),
                       "--curve-clients-dir", str(tmp_path / "clients"),
                       "--curve-engines-dir", str(tmp_path / "engines"))
    keys = ["--curve-secret-key", str(client_secret), "--curve-server-key", str(broker_key)]
    out = subprocess.run([*ZEMBED, "stats", "--once", "--json", "--stats-endpoint", stack.stats,
                          "--timeout-s", "20", *keys], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["broker"]["stats_socket"]["bound"] is True
    stranger = Subscriber(stack.stats, zmq.Context.instance())  # no key: no handshake, no data
    try:
        assert stranger.next(timeout_s=1.5) is None
    finally:
        stranger.close()

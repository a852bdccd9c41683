"""Stats pieces without processes: instruments, liveness, the snapshot's documentation, the
dashboard's arithmetic and drawing, the exporter's metric families, the Grafana dashboard."""

from __future__ import annotations

import io
import json
import re
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zembed import protocol as p
from zembed.broker.metrics import LATENCY_BUCKETS_S, Histogram, LatencyWindow, LoopMeter
from zembed.broker.replies import Replier
from zembed.broker.state import BrokerState
from zembed.broker.stats import BrokerStats, ConnectionCounter, LoopWatchdog, StatsPublisher
from zembed.cache.backends import NullCache
from zembed.security import CurveRefusals
from zembed.tools import dashboard
from zembed.tools.exporter import SnapshotCollector

DOCS = Path(__file__).parent.parent / "docs"


def ready(lane: str = "text", credits: int = 8) -> dict[str, Any]:
    return {"lane": lane, "kinds": [lane], "fingerprint": f"fp-{lane}", "dim": 4,
            "credits": credits, "model": "m", "pid": 42}


# -- instruments -------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_with_le_semantics() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap["counts"] == [2, 4, 5] and snap["count"] == 5  # a bound is in its bucket
    assert snap["le"] == [0.1, 1.0] and snap["sum_s"] == pytest.approx(4.65)
    assert len(Histogram().snapshot()["counts"]) == len(LATENCY_BUCKETS_S) + 1


def test_latency_window_nearest_rank_and_age() -> None:
    w = LatencyWindow(window_s=10.0, max_samples=100)
    assert w.quantiles_ms(0.0) == {}
    for i in range(1, 101):
        w.observe(0.0, i / 1000)
    q = w.quantiles_ms(5.0)
    assert (q["p50"], q["p90"], q["p99"], q["max"], q["window"]) == (50, 90, 99, 100, 100)
    w.observe(8.0, 0.5)  # overwrites the oldest slot of the ring
    assert w.quantiles_ms(8.0)["window"] == 100
    assert w.quantiles_ms(12.0) == {"p50": 500, "p90": 500, "p95": 500, "p99": 500,
                                    "max": 500, "window": 1}  # the rest are too old now


def test_loop_meter_utilisation_and_longest_turn() -> None:
    m = LoopMeter(0.0)
    m.begin(0.1)
    m.end(0.3)
    m.begin(0.5)
    m.end(0.55)
    m.roll(1.0)
    snap = m.snapshot()
    assert snap["turns"] == 2 and snap["utilisation"] == pytest.approx(0.25)
    assert snap["max_turn_ms"] == pytest.approx(200)
    m.roll(2.0)
    assert m.snapshot()["utilisation"] == 0 and m.snapshot()["busy_s"] == pytest.approx(0.25)


def test_watchdog_logs_where_a_stuck_turn_is(caplog: pytest.LogCaptureFixture) -> None:
    meter = LoopMeter(time.monotonic())
    dog = LoopWatchdog(meter, stall_s=0.2)
    dog.start()  # watches this thread
    try:
        meter.begin(time.monotonic())
        deadline = time.monotonic() + 5
        while dog.stalls == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # "stuck" in this very function
        time.sleep(0.3)
        meter.end(time.monotonic())
    finally:
        dog.stop()
    assert dog.stalls == 1  # one stuck turn is reported once
    assert "broker loop stuck in one turn" in caplog.text
    assert "test_watchdog_logs_where_a_stuck_turn_is" in caplog.text  # with the loop's stack


def test_an_engine_that_missed_a_heartbeat_is_not_ready() -> None:
    state = BrokerState(("text",), heartbeat_interval_s=1.0, liveness=3)
    engine = state.register(b"a", ready(), 0.0)
    assert state.missing_lanes(1.9) == [] and state.is_live(engine, 1.9)
    assert state.missing_lanes(2.1) == ["text"]  # late: not ready, still served
    state.touch(b"a", 2.5)
    assert state.missing_lanes(3.0) == []
    assert state.dead_engines(5.6) == [b"a"]


def test_engine_batch_counters_from_reply_headers() -> None:
    state = BrokerState(("text",))
    engine = state.register(b"a", ready(), 0.0)
    engine.note_reply({"tok": 1, "status": 200})  # an engine that does not send them
    engine.note_reply({"batches": 4, "batch_items": 10})
    view = state.snapshot(0.1)["lanes"]["text"]["engines"][0]
    assert (view["batches"], view["batch_items"], view["mean_batch_size"]) == (4, 10, 2.5)


# -- the snapshot --------------------------------------------------------------------------------


class _Flow:
    cache = NullCache()
    cache_corrupt = 0

    def __init__(self, replier: Replier) -> None:
        self.replier = replier


@pytest.fixture
def broker_stats() -> Iterator[BrokerStats]:
    ctx: zmq.Context[Any] = zmq.Context()
    frontend = ctx.socket(zmq.ROUTER)
    state = BrokerState(("text", "image"))
    state.register(b"\x00a", ready("text"), 0.0)
    state.register(b"\x00b", {**ready("image", 16), "random_weights": True}, 0.0)
    flow = _Flow(Replier(frontend, state, {"client_gone": 0}, clock=lambda: 0.0))
    stats = BrokerStats(state, flow, {"client_gone": 0},  # type: ignore[arg-type]
                        StatsPublisher(ctx, ""), ConnectionCounter(frontend), interval_s=1.0,
                        stall_s=0, now=0.0)
    lane = state.stats["text"]
    state.count("text", p.OK, 3, 100)
    lane.timed(p.OK, 0.004, 0.5)
    state.count("text", p.OVERLOADED, 1, 20)
    lane.timed(p.OVERLOADED, 0.0001, 0.5)
    lane.cache_hits["text"], lane.cache_misses["text"] = 2, 5
    yield stats
    stats.close()
    frontend.close(linger=0)
    ctx.term()


def test_every_snapshot_field_is_documented(broker_stats: BrokerStats) -> None:
    snap = broker_stats.snapshot(0.5)
    doc = (DOCS / "stats.md").read_text(encoding="utf-8")
    lane = snap["lanes"]["text"]
    fields = {*snap, *snap["broker"], *(f"loop.{k}" for k in snap["broker"]["loop"]),
              *snap["cache"], *lane, *lane["engines"][0], *lane["latency_ms"],
              *lane["latency_hist"], *snap["broker"]["stats_socket"]}
    assert not sorted(f for f in fields if f"`{f}`" not in doc)


def test_a_failed_handshake_is_never_a_client() -> None:
    """ConnectionCounter's arithmetic on the monitor's events, as libzmq orders them per
    connection (accept, one handshake event, disconnect), interleaved across connections."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    counter = ConnectionCounter(sock)
    try:
        for event in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                      zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_DISCONNECTED,
                      zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED):
            counter.count(event)
        assert (counter.accepted, counter.failed, counter.open) == (1, 3, 2)
        counter.count(zmq.EVENT_DISCONNECTED)  # the last refused one goes: the client stays
        assert counter.open == 1
        counter.count(zmq.EVENT_DISCONNECTED)
        assert counter.open == 0
    finally:
        counter.close()
        sock.close(linger=0)
        ctx.term()


def test_snapshot_counts_curve_refusals_per_socket(broker_stats: BrokerStats) -> None:
    assert broker_stats.snapshot(0.5)["broker"]["curve_refused"] == {"frontend": 0, "backend": 0}
    refusals = CurveRefusals({"frontend": "/c", "backend": "/e"})
    broker_stats.curve = refusals
    refusals.refused("backend", "10.1.1.1", b"k" * 40)
    refusals.refused("backend", "10.1.1.1", b"k" * 40)
    snap = broker_stats.snapshot(0.5)
    assert snap["broker"]["curve_refused"] == {"frontend": 0, "backend": 2}
    collector = SnapshotCollector()
    collector.update(snap)
    assert scrape(collector)[("zembed_curve_refused_total", (("socket", "backend"),))] == 2


def test_snapshot_readiness_names_what_is_missing(broker_stats: BrokerStats) -> None:
    snap = broker_stats.snapshot(0.5)
    assert snap["broker"]["ready"] is True and snap["schema"] == 1
    assert snap["lanes"]["image"]["engines"][0]["random_weights"] is True
    missing, reasons = broker_stats.readiness(10.0)  # both engines silent for 10 s
    assert missing == ["text", "image"] and "last heard 10.0 s ago" in reasons[0]
    broker_stats.state.remove(b"\x00b")
    assert "no engine registered" in broker_stats.readiness(0.5)[1][0]


# -- the dashboard -------------------------------------------------------------------------------


def test_sparkline() -> None:
    assert dashboard.sparkline([0, 0]) == "▁▁"
    assert dashboard.sparkline([0, 5, 10]) == "▁▅█"


def test_rates_between_snapshots_and_a_restart(broker_stats: BrokerStats) -> None:
    a = broker_stats.snapshot(0.5)
    state = broker_stats.state
    for _ in range(10):
        state.count("text", p.OK, 2, 1000)
    state.count("text", p.OVERLOADED, 1, 10)
    state.stats["text"].cache_hits["text"] += 15
    state.stats["text"].cache_misses["text"] += 5
    b = broker_stats.snapshot(2.5)
    rates = dashboard.lane_rates(a, b)["text"]
    assert rates["requests"] == pytest.approx(5.5) and rates["ok"] == pytest.approx(5)
    assert rates["rejected"] == pytest.approx(0.5) and rates["errors"] == 0
    assert rates["items"] == pytest.approx(10) and rates["hit_ratio"] == pytest.approx(0.75)
    assert rates["bytes_out"] == pytest.approx(5005)
    restarted = {**b, "broker": {**b["broker"], "started_at": b["broker"]["started_at"] + 1}}
    assert dashboard.lane_rates(a, restarted) == {}


def test_dashboard_frames(broker_stats: BrokerStats) -> None:
    board = dashboard.Dashboard("tcp://x:5557")
    board.frame(broker_stats.snapshot(0.5))
    broker_stats.state.count("text", p.OK, 1)
    lines = board.frame(broker_stats.snapshot(1.5))
    text = "\n".join(lines)
    assert "ready" in lines[0] and "REQ/S" in text and "RANDOM WEIGHTS" in text
    row = next(line for line in lines if line.startswith("text "))
    assert "1.0" in row and row.endswith("  █")  # one point of history so far

    class Source:
        where = "tcp://x:5557"

        def __init__(self, snaps: list[dict[str, Any] | None]) -> None:
            self.snaps = deque(snaps)

        def next(self, timeout_s: float) -> dict[str, Any] | None:
            return self.snaps.popleft()

        def close(self) -> None:
            pass

    out = io.StringIO()
    snap = broker_stats.snapshot(2.0)
    assert dashboard.run(Source([snap, None, snap]), out=out, frames=2) == 0
    assert "no snapshot from tcp://x:5557" in out.getvalue()
    assert out.getvalue().count("REQ/S HISTORY") == 3  # the stale frame keeps the figures


# -- the exporter --------------------------------------------------------------------------------


def scrape(collector: SnapshotCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_exporter_families(broker_stats: BrokerStats) -> None:
    collector = SnapshotCollector()
    assert scrape(collector) == {("zembed_up", ()): 0.0}
    collector.update(broker_stats.snapshot(0.5))
    m = scrape(collector)
    assert m[("zembed_up", ())] == 1
    assert m[("zembed_requests_total", (("lane", "text"), ("status", "200")))] == 1
    assert m[("zembed_items_total", (("lane", "text"), ("status", "200")))] == 3
    assert m[("zembed_cache_hits_total", (("kind", "text"), ("lane", "text")))] == 2
    text = (("lane", "text"),)
    assert m[("zembed_request_duration_seconds_bucket", (*text, ("le", "0.0025")))] == 0
    assert m[("zembed_request_duration_seconds_bucket", (*text, ("le", "0.005")))] == 1
    assert m[("zembed_request_duration_seconds_count", text)] == 1
    assert m[("zembed_reject_duration_seconds_bucket", (*text, ("le", "0.0001")))] == 1
    assert m[("zembed_request_duration_window_seconds", (*text, ("quantile", "0.99")))] == \
        pytest.approx(0.004)
    assert m[("zembed_engine_credits", (("engine", "0061"), ("lane", "text")))] == 8
    assert m[("zembed_engine_random_weights", (("engine", "0062"), ("lane", "image")))] == 1
    assert m[("zembed_ready", ())] == 1 and m[("zembed_sent_bytes_total", text)] == 120
    assert m[("zembed_curve_refused_total", (("socket", "backend"),))] == 0  # CURVE off
    collector.stale_s = -1  # a snapshot too old is not served
    assert scrape(collector) == {("zembed_up", ()): 0.0}


def documented_metrics() -> set[str]:
    doc = (DOCS / "stats.md").read_text(encoding="utf-8")
    return {line.split("`")[1] for line in doc.splitlines() if line.startswith("| `zembed_")}


def test_every_exported_metric_is_documented(broker_stats: BrokerStats) -> None:
    collector = SnapshotCollector()
    collector.update(broker_stats.snapshot(0.5))
    names = {name for name, _ in scrape(collector)}
    documented = documented_metrics()
    undocumented = sorted(n for n in names if n not in documented and not any(
        n.endswith(s) and n.removesuffix(s) in documented for s in ("_bucket", "_count", "_sum")))
    assert not undocumented


def test_grafana_dashboard_uses_documented_metrics() -> None:
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"zembed_[a-z_]+", e)}
    documented = documented_metrics()
    assert used and not sorted(m for m in used if m not in documented and
                               m.removesuffix("_bucket") not in documented)
    assert {"zembed_requests_total", "zembed_request_duration_seconds_bucket",
            "zembed_cache_hits_total", "zembed_engine_credits"} <= used


def test_dashboard_shows_brokers_served_and_cluster_masters() -> None:
    engine = {"id": "e1", "credits_free": 10, "credits_total": 21, "items_in_flight": 11,
              "heartbeat_age_s": 0.1, "fingerprint": "fp", "alive": True,
              "brokers": ["tcp://a:5556", "tcp://b:5556", "tcp://c:5556"], "serving": 2}
    assert "serves 2 of 3 brokers" in dashboard.engine_line(engine)
    assert "serves" not in dashboard.engine_line({**engine, "brokers": ["tcp://a:5556"]})
    snap = {"broker": {}, "lanes": {}, "uptime_s": 1.0, "cache": {
        "backend": "redis-cluster", "up": True,
        "nodes": [{"node": "a:7000", "slots": 5461, "up": True},
                  {"node": "b:7000", "slots": 5462, "up": False},
                  {"node": "c:7000", "slots": 5461, "up": True}]}}
    assert "redis-cluster 2/3 masters up" in "\n".join(dashboard.header_lines(snap, "x"))

"""``zembed exporter``: the broker's stats snapshots as Prometheus metrics.

A collector holds the latest snapshot (read from the stats socket by the main thread) and turns
it into metric families when Prometheus scrapes: the broker's monotonic counters become
counters (so ``rate()`` works), its cumulative latency buckets become histograms (so
``histogram_quantile()`` works), and the rest are gauges. A snapshot older than ``stale_s``
is not served: ``zembed_up`` drops to 0 and the other series disappear rather than freeze.
Names and labels are listed in ``docs/stats.md``.

The text exposition format (version 0.0.4) is written here and served by the standard
library's HTTP server, so the exporter runs in a client-only install (``pip install zembed``).
Families and samples have the shape of ``prometheus_client``'s (``name``, ``type``,
``documentation``, ``samples``), so the collector can also be registered in its registry, and
:func:`exposition` writes what its ``generate_latest`` writes.
"""

from __future__ import annotations

import http.server
import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from zembed.tools.statsource import SnapshotSource

DEFAULT_PORT = 9108
#: Window quantiles exported, and their ``quantile`` label (Prometheus summary style).
QUANTILES = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Sample(NamedTuple):
    """One series value (the fields of ``prometheus_client.samples.Sample``)."""

    name: str
    labels: dict[str, str]
    value: float
    timestamp: float | None = None
    exemplar: None = None
    native_histogram: None = None


@dataclass
class Metric:
    """One metric family: ``type`` is counter, gauge or histogram."""

    name: str
    documentation: str
    type: str
    samples: list[Sample] = field(default_factory=list)
    unit: str = ""


def _labels(names: list[str], values: list[str]) -> dict[str, str]:
    return {n: str(v) for n, v in zip(names, values, strict=True)}


def _counter(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]
             ) -> Metric:
    return Metric(name, doc, "counter",
                  [Sample(f"{name}_total", _labels(labels, values), value) for values, value in rows])


def _gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]
           ) -> Metric:
    return Metric(name, doc, "gauge",
                  [Sample(name, _labels(labels, values), value) for values, value in rows])


def _histogram(name: str, doc: str, lanes: dict[str, Any], key: str) -> Metric:
    family = Metric(name, doc, "histogram")
    for lane, row in lanes.items():
        hist = row.get(key)
        if not hist:
            continue
        bounds = [repr(float(b)) for b in hist["le"]] + ["+Inf"]  # as prometheus_client writes
        counts = list(hist["counts"])
        family.samples += [Sample(f"{name}_bucket", {"lane": lane, "le": le}, count)
                           for le, count in zip(bounds, counts, strict=True)]
        family.samples += [Sample(f"{name}_count", {"lane": lane}, counts[-1]),
                           Sample(f"{name}_sum", {"lane": lane}, hist["sum_s"])]
    return family


def _number(value: float) -> str:
    """A sample value as Prometheus' Go code writes it (``1.0``, ``+Inf``, ``1.5e+09``)."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(metrics: Iterable[Metric]) -> str:
    """The text exposition format (0.0.4) of ``metrics``."""
    out: list[str] = []
    for metric in metrics:
        name = f"{metric.name}_total" if metric.type == "counter" else metric.name
        doc = metric.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {metric.type}\n")
        for s in metric.samples:
            labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(s.labels.items()))
            out.append(f"{s.name}{{{labels}}} {_number(s.value)}\n" if labels
                       else f"{s.name} {_number(s.value)}\n")
    return "".join(out)


def broker_families(snap: dict[str, Any]) -> Iterator[Metric]:
    """Broker-wide series: identity, readiness, loop, clients, cache, event counters."""
    broker, cache = snap.get("broker", {}), snap.get("cache", {})
    loop = broker.get("loop", {})
    yield _gauge("zembed_broker_info", "Broker version (value 1).", ["version"],
                 [([str(snap.get("version"))], 1)])
    yield _gauge("zembed_broker_uptime_seconds", "Seconds since the broker started.", [],
                 [([], snap["uptime_s"])])
    yield _gauge("zembed_broker_start_time_seconds", "Broker start, Unix time.", [],
                 [([], broker.get("started_at", 0))])
    yield _gauge("zembed_ready", "1 if every lane has a live engine and the cache is usable.",
                 [], [([], 1 if broker.get("ready") else 0)])
    yield _counter("zembed_loop_turns", "Broker loop turns.", [], [([], loop.get("turns", 0))])
    yield _counter("zembed_loop_busy_seconds", "Time the loop spent outside poll().", [],
                   [([], loop.get("busy_s", 0.0))])
    yield _gauge("zembed_loop_busy_ratio", "Share of the last interval the loop was busy.", [],
                 [([], loop.get("utilisation", 0.0))])
    yield _gauge("zembed_loop_max_turn_seconds", "Longest loop turn of the last interval.", [],
                 [([], loop.get("max_turn_ms", 0.0) / 1000)])
    yield _counter("zembed_loop_stalls", "Loop turns the watchdog saw run past loop_stall_s.",
                   [], [([], loop.get("stalls", 0))])
    yield _gauge("zembed_connected_clients", "Client sessions open on the frontend.", [],
                 [([], broker.get("connected_clients", 0))])
    yield _counter("zembed_clients_accepted",
                   "Frontend connections whose handshake completed.", [],
                   [([], broker.get("clients_accepted", 0))])
    yield _counter("zembed_handshakes_failed", "Frontend connections whose handshake failed.",
                   [], [([], broker.get("handshakes_failed", 0))])
    yield _counter("zembed_curve_refused",
                   "CURVE handshakes refused for a key not allowed on the socket.", ["socket"],
                   [([k], v) for k, v in broker.get("curve_refused", {}).items()])
    yield _gauge("zembed_engine_requests_in_flight", "Engine requests awaiting a reply.", [],
                 [([], snap.get("in_flight", 0))])
    yield _counter("zembed_late_replies", "Engine replies that came after their request ended.",
                   [], [([], snap.get("late_replies", 0))])
    yield _counter("zembed_engine_recredits", "Credit changes engines announced (their share "
                   "of several brokers moved).", [], [([], snap.get("recredits", 0))])
    yield _counter("zembed_broker_events", "Broker events (client_gone, bad frames, bugs).",
                   ["event"], [([k], v) for k, v in snap.get("counters", {}).items()])
    backend = str(cache.get("backend", "off"))
    yield _gauge("zembed_cache_up", "1 if the cache backend is reachable (or off).",
                 ["backend"], [([backend], 1 if cache.get("up", True) else 0)])
    yield _counter("zembed_cache_errors", "Failed cache reads, writes and probes.",
                   ["backend"], [([backend], cache.get("errors", 0))])
    yield _counter("zembed_cache_corrupt", "Cache entries that failed their check (misses).",
                   [], [([], cache.get("corrupt", 0))])
    yield _counter("zembed_cache_writes_dropped", "Vectors not written (write queue full).",
                   ["backend"], [([backend], cache.get("writes_dropped", 0))])
    yield _counter("zembed_cache_reads_cut", "Keys a turn's cache budget did not reach (misses).",
                   ["backend"], [([backend], cache.get("reads_cut", 0))])
    nodes = cache.get("nodes") or []
    yield _gauge("zembed_cache_node_up", "Redis Cluster: 1 while the master's breaker is closed.",
                 ["node"], [([str(n.get("node"))], 1 if n.get("up") else 0) for n in nodes])
    yield _gauge("zembed_cache_node_slots", "Redis Cluster: slots the master serves.",
                 ["node"], [([str(n.get("node"))], n.get("slots", 0)) for n in nodes])


def lane_families(lanes: dict[str, Any]) -> Iterator[Metric]:
    """Per-lane series: requests, items, cache, bytes, latency, credits, engine counts."""
    def per_lane(key: str) -> list[tuple[list[str], float]]:
        return [([lane], row.get(key, 0)) for lane, row in lanes.items()]

    def by(key: str) -> list[tuple[list[str], float]]:
        return [([lane, k], v) for lane, row in lanes.items()
                for k, v in row.get(key, {}).items()]

    yield _gauge("zembed_lane_ready", "1 if the lane has a live engine.", ["lane"],
                 [([lane], 1 if row.get("ready") else 0) for lane, row in lanes.items()])
    yield _counter("zembed_requests", "Answered requests by status.", ["lane", "status"],
                   by("requests"))
    yield _counter("zembed_items", "Items of answered requests by status.", ["lane", "status"],
                   by("items"))
    yield _counter("zembed_items_dispatched", "Items sent to engines (cache misses, deduped).",
                   ["lane"], per_lane("items_dispatched"))
    yield _counter("zembed_cache_hits", "Items answered from the cache.", ["lane", "kind"],
                   by("cache_hits"))
    yield _counter("zembed_cache_misses", "Items not found in the cache.", ["lane", "kind"],
                   by("cache_misses"))
    yield _counter("zembed_cache_lookup_errors", "Items whose lookup failed (cache down; also "
                   "counted as misses).", ["lane", "kind"], by("cache_errors"))
    yield _counter("zembed_single_flight_joins", "Items that joined an identical one in flight.",
                   ["lane"], per_lane("single_flight_joins"))
    for outcome in ("admitted", "refused"):
        yield _counter(f"zembed_class_{outcome}",
                       f"Requests that needed credits and were {outcome}, by class "
                       "(interactive, bulk).", ["lane", "class"],
                       [([lane, c], v.get(outcome, 0)) for lane, row in lanes.items()
                        for c, v in (row.get("classes") or {}).items()])
    lines = [(lane, c, v) for lane, row in lanes.items()
             for c, v in (row.get("retry_lines") or {}).items()]
    yield _gauge("zembed_retry_line_waiting", "Tickets of refused requests waiting for their "
                 "retry, by class.", ["lane", "class"],
                 [([lane, c], v.get("waiting", 0)) for lane, c, v in lines])
    for outcome, what in (("served", "admitted on a retry"),
                          ("expired", "dropped: the request did not come back in time")):
        yield _counter(f"zembed_retry_tickets_{outcome}", f"Tickets {what}, by class.",
                       ["lane", "class"], [([lane, c], v.get(outcome, 0)) for lane, c, v in lines])
    yield _gauge("zembed_lane_bulk_reserve", "Credits of the lane kept from bulk requests.",
                 ["lane"], per_lane("bulk_reserve"))
    yield _counter("zembed_received_bytes", "Bytes of embed requests (header and body).",
                   ["lane"], per_lane("bytes_in"))
    yield _counter("zembed_sent_bytes", "Bytes of replies (header and vectors).", ["lane"],
                   per_lane("bytes_out"))
    yield _histogram("zembed_request_duration_seconds",
                     "Receipt to reply of successful (200) requests.", lanes, "latency_hist")
    yield _histogram("zembed_reject_duration_seconds",
                     "Receipt to reply of refused (429) requests: time to say no.", lanes,
                     "reject_hist")
    for name, key, what in (("zembed_request_duration_window_seconds", "latency_ms", "200s"),
                            ("zembed_reject_duration_window_seconds", "reject_ms", "429s")):
        yield _gauge(name, f"Quantiles of recent {what} (last 10 s, at most 4096).",
                     ["lane", "quantile"],
                     [([lane, label], row[key][q] / 1000) for lane, row in lanes.items()
                      for q, label in QUANTILES.items() if q in row.get(key, {})])
    yield _gauge("zembed_lane_credits", "Credits of the lane's engines.", ["lane"],
                 per_lane("credits_total"))
    yield _gauge("zembed_lane_credits_free", "Free credits of the lane's engines.", ["lane"],
                 per_lane("credits_free"))
    yield _gauge("zembed_lane_credits_limit", "Credits the broker lets the lane's engines hold "
                 "now (adaptive limits, or all they announced).", ["lane"],
                 per_lane("credits_limit"))
    yield _gauge("zembed_lane_latency_target_seconds", "The lane's latency target (adaptive "
                 "credits; absent with fixed credits).", ["lane"],
                 [([lane], row["latency_target_ms"] / 1000) for lane, row in lanes.items()
                  if row.get("latency_target_ms")])
    yield _gauge("zembed_engines", "Registered engines.", ["lane"],
                 [([lane], len(row["engines"])) for lane, row in lanes.items()])
    yield _counter("zembed_engines_registered", "Engine registrations.", ["lane"],
                   per_lane("engines_registered"))
    yield _counter("zembed_engines_lost", "Engines lost (dead, gone, unreachable).", ["lane"],
                   per_lane("engines_lost"))


def engine_families(lanes: dict[str, Any]) -> Iterator[Metric]:
    """Per-engine series, labelled ``lane`` and ``engine`` (its routing id, hex)."""
    engines = [(lane, e) for lane, row in lanes.items() for e in row["engines"]]
    ids = [[lane, e["id"]] for lane, e in engines]

    def each(key: str, scale: float = 1.0) -> list[tuple[list[str], float]]:
        return [(i, (e.get(key) or 0) * scale) for i, (_, e) in zip(ids, engines, strict=True)]

    labels = ["lane", "engine"]
    yield _gauge("zembed_engine_info", "Engine identity (value 1).",
                 [*labels, "model", "fingerprint", "device", "pid"],
                 [([*i, str(e.get("model")), str(e.get("fingerprint")), str(e.get("device")),
                    str(e.get("pid"))], 1) for i, (_, e) in zip(ids, engines, strict=True)])
    yield _gauge("zembed_engine_alive", "1 if the engine answered its last heartbeat.", labels,
                 [(i, 1 if e.get("alive") else 0) for i, (_, e) in zip(ids, engines, strict=True)])
    yield _gauge("zembed_engine_random_weights", "1 if the engine serves random weights.",
                 labels, [(i, 1 if e.get("random_weights") else 0)
                          for i, (_, e) in zip(ids, engines, strict=True)])
    yield _gauge("zembed_engine_credits", "Credits the engine announced.", labels,
                 each("credits_total"))
    yield _gauge("zembed_engine_credits_free", "The engine's free credits.", labels,
                 each("credits_free"))
    yield _gauge("zembed_engine_credits_limit", "Credits the broker lets the engine hold now "
                 "(the adaptive limit, or all it announced).", labels, each("credits_limit"))
    adaptive = [(i, e["adaptive"]) for i, (_, e) in zip(ids, engines, strict=True)
                if isinstance(e.get("adaptive"), dict)]
    yield _counter("zembed_engine_adaptive_cuts", "Times the adaptive limit was cut (a request "
                   "over the lane's latency target).", labels,
                   [(i, a.get("cuts", 0)) for i, a in adaptive])
    yield _counter("zembed_engine_adaptive_late", "Engine requests slower than the lane's "
                   "latency target.", labels, [(i, a.get("late", 0)) for i, a in adaptive])
    yield _gauge("zembed_engine_max_batch", "Most items in one forward pass (sized or fixed).",
                 labels, each("max_batch"))
    sized = [(i, e["sizing"]) for i, (_, e) in zip(ids, engines, strict=True)
             if isinstance(e.get("sizing"), dict)]
    yield _gauge("zembed_engine_threads", "torch threads the engine runs (from its sizing).",
                 labels, [(i, z.get("threads") or 0) for i, z in sized])
    yield _gauge("zembed_engine_warmup_items_per_second",
                 "The engine's measured throughput curve at warm-up, by batch size.",
                 [*labels, "batch"],
                 [([*i, str(point[0])], point[2]) for i, z in sized
                  for point in z.get("curve") or [] if len(point) >= 3])
    yield _gauge("zembed_engine_items_in_flight", "Items the engine is computing.", labels,
                 each("items_in_flight"))
    yield _counter("zembed_engine_requests", "Engine requests answered.", labels,
                   each("requests_done"))
    yield _counter("zembed_engine_items", "Items the engine answered.", labels,
                   each("items_done"))
    yield _counter("zembed_engine_batches", "Batches the engine ran (since its start).", labels,
                   each("batches"))
    yield _counter("zembed_engine_batch_items", "Items in those batches.", labels,
                   each("batch_items"))
    yield _gauge("zembed_engine_heartbeat_age_seconds", "Seconds since the engine was heard.",
                 labels, each("heartbeat_age_s"))
    yield _gauge("zembed_engine_brokers_serving", "Brokers the engine serves now (its credits "
                 "are split over them).", labels, each("serving"))


def families(snap: dict[str, Any]) -> Iterator[Metric]:
    """Every metric family of one snapshot."""
    yield from broker_families(snap)
    yield from lane_families(snap["lanes"])
    yield from engine_families(snap["lanes"])


class SnapshotCollector:
    """Serves the latest snapshot; ``zembed_up`` says whether it is fresh."""

    def __init__(self, stale_s: float = 5.0) -> None:
        self.stale_s = stale_s
        self.latest: tuple[float, dict[str, Any]] | None = None

    def update(self, snap: dict[str, Any]) -> None:
        self.latest = (time.monotonic(), snap)  # one assignment: atomic for the scrape thread

    def collect(self) -> Iterable[Metric]:
        latest = self.latest
        age = None if latest is None else time.monotonic() - latest[0]
        fresh = age is not None and age <= self.stale_s
        yield _gauge("zembed_up", "1 if the exporter has a fresh snapshot from the broker.", [],
                     [([], 1 if fresh else 0)])
        if latest is None or not fresh:
            return
        yield _gauge("zembed_snapshot_age_seconds", "Age of the snapshot served.", [],
                     [([], age or 0.0)])
        yield from families(latest[1])


def _handler(collector: SnapshotCollector) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path not in ("/metrics", "/"):
                self.send_error(404, "zembed exporter: see /metrics")
                return
            if path == "/":
                body, ctype = b'<a href="/metrics">/metrics</a>\n', "text/html; charset=utf-8"
            else:
                body, ctype = exposition(collector.collect()).encode(), CONTENT_TYPE
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape is noise

    return Handler


def serve(source: SnapshotSource, port: int, addr: str = "127.0.0.1",
          stop: threading.Event | None = None) -> None:
    """Serve ``/metrics`` on ``addr:port`` and feed it from ``source`` until ``stop`` is set."""
    collector = SnapshotCollector()
    server = http.server.ThreadingHTTPServer((addr, port), _handler(collector))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="exporter-http", daemon=True)
    thread.start()
    stop = stop or threading.Event()
    try:
        while not stop.is_set():
            snap = source.next(timeout_s=0.5)
            if snap is not None:
                collector.update(snap)
                collector.stale_s = max(5.0, 3 * float(snap.get("interval_s", 1.0)))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)

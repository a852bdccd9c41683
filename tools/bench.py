"""``zembed bench``: the load generator users run to size a deployment.

Closed loop (``concurrency`` workers, each keeping ``window`` requests in flight) shows
capacity; open loop (a fixed arrival rate, whatever the answers) shows what overload looks
like: how much is rejected, how fast, and what the accepted requests' latency does. Every run
is bounded by a duration and a request count. One lean wire-level client drives all of it.
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from zembed import protocol as p
from zembed.client.codec import embed_frames, reply_id
from zembed.client.link import endpoints
from zembed.security import arm_client
from zembed.tools.inputs import InputSource

KIND_LANE = {p.KIND_TEXT: p.LANE_TEXT, p.KIND_CLIP_TEXT: p.LANE_IMAGE, p.KIND_IMAGE: p.LANE_IMAGE}
#: Open loop never keeps more than this many requests outstanding (a bound, not a queue).
OPEN_LOOP_MAX_IN_FLIGHT = 20_000
#: Status counted for a request that got no answer within the client timeout.
NO_ANSWER = 0


@dataclass
class BenchSpec:
    """What to send and how.

    :param kinds: kinds to send; several are interleaved (``mix``).
    :param items: items per request.
    :param concurrency: closed loop: workers. :param window: requests each keeps in flight.
    :param rate: open loop: requests per second (0 = closed loop).
    :param duration_s: stop sending after this long. :param requests: ...or after this many.
    :param repeat: share of items repeated from a small pool (cache hits).
    :param priority: the requests' class (``interactive``/``bulk``); None: the broker's default.
    """

    kinds: tuple[str, ...] = (p.KIND_TEXT,)
    items: int = 1
    concurrency: int = 8
    window: int = 1
    rate: float = 0.0
    duration_s: float = 10.0
    requests: int = 1_000_000
    repeat: float = 0.0
    timeout_s: float = 30.0
    normalize: bool = True
    priority: str | None = None


@dataclass
class BenchReport:
    """Counts and latencies of one run (latencies of successful requests only)."""

    sent: int = 0
    ok: int = 0
    items_ok: int = 0
    cached_items: int = 0
    item_errors: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    reject_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    duplicates: int = 0  # replies for a request that had already been answered
    late: int = 0  # replies that came after the client had given up (counted as no answer)

    @property
    def rejected(self) -> int:
        return self.statuses.get(p.OVERLOADED, 0)

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != p.OVERLOADED)

    def summary(self) -> dict[str, Any]:
        """The figures, as printed and as ``--json`` emits them."""
        done = self.ok + self.rejected + self.errors
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        rej = np.array(self.reject_ms) if self.reject_ms else np.array([np.nan])
        elapsed = max(self.elapsed_s, 1e-9)
        return {
            "sent": self.sent, "answered": done, "ok": self.ok, "rejected_429": self.rejected,
            "errors": self.errors,
            "errors_by_status": {str(s): n for s, n in sorted(self.statuses.items())
                                 if s != p.OVERLOADED},
            "requests_per_s": round(self.ok / elapsed, 1),
            "items_per_s": round(self.items_ok / elapsed, 1),
            "success_pct": round(100 * self.ok / done, 2) if done else None,
            "rejected_pct": round(100 * self.rejected / done, 2) if done else None,
            "latency_ms": {q: round(float(np.percentile(lat, v)), 3) for q, v in
                           (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "time_to_429_ms": {q: round(float(np.percentile(rej, v)), 3) for q, v in
                               (("p50", 50), ("p99", 99))},
            "cache_hit_ratio": (round(self.cached_items / (self.items_ok + 0.0), 4)
                                if self.items_ok else None),
            "item_errors": self.item_errors,
            "no_answer": self.statuses.get(NO_ANSWER, 0),
            "duplicates": self.duplicates, "late_replies": self.late,
            "elapsed_s": round(self.elapsed_s, 3),
        }


class Bench:
    """Runs a :class:`BenchSpec` against a broker and fills a :class:`BenchReport`.

    The load generator speaks the wire protocol directly: one DEALER socket, frames built with
    the SDK's own codec, one poll loop, and only reply headers decoded. It is deliberately
    leaner than the SDK (no future or timer per request), so on a small machine it measures
    the broker rather than itself; the SDK's own cost shows up in the tests and examples.
    """

    def __init__(self, endpoint: str, spec: BenchSpec, progress: bool = True,
                 curve: tuple[str, str] = ("", "")) -> None:
        self.endpoint = endpoint
        self.curve = curve  # (this client's .key_secret file, the broker's .key file)
        self.spec = spec
        self.progress = progress
        self.report = BenchReport()
        self.sources = {k: InputSource(k, spec.repeat, seed=i + 1)
                        for i, k in enumerate(spec.kinds)}
        self._outstanding: dict[int, float] = {}  # request id -> perf_counter() when sent
        self._given_up: set[int] = set()  # ids counted as no answer (a later reply is late)
        self._parked: list[float] = []  # closed loop: slots backing off after a 429, until when

    def run(self) -> BenchReport:
        """Run to completion (bounded by duration and request count)."""
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        arm_client(sock, *self.curve)
        for endpoint in endpoints(self.endpoint):  # several brokers: dealt round-robin
            sock.connect(endpoint)
        try:
            self._loop(sock)
        finally:
            sock.close(0)
            ctx.term()
        if self.progress:
            sys.stderr.write("\n")
        return self.report

    def _loop(self, sock: zmq.Socket[Any]) -> None:
        spec, report = self.spec, self.report
        slots = max(1, spec.concurrency * spec.window)
        interval = 1.0 / spec.rate if spec.rate > 0 else 0.0
        t0 = time.perf_counter()
        stop_at, next_at, tick_at = t0 + spec.duration_s, t0, t0 + 1.0
        while True:
            now = time.perf_counter()
            sending = now < stop_at and report.sent < spec.requests
            if interval:
                while sending and next_at <= now:
                    next_at += interval
                    if len(self._outstanding) < OPEN_LOOP_MAX_IN_FLIGHT:
                        self._send(sock)
                    sending = report.sent < spec.requests
            else:
                while self._parked and self._parked[0] <= now:
                    heapq.heappop(self._parked)
                while sending and len(self._outstanding) + len(self._parked) < slots:
                    self._send(sock)
                    sending = report.sent < spec.requests
            if not sending and not self._outstanding:
                break
            wait = 0.1
            if sending and interval:
                wait = next_at - now
            elif sending and self._parked:
                wait = self._parked[0] - now
            if sock.poll(math.ceil(wait * 1000) if wait > 0 else 0):
                self._drain(sock)
            now = time.perf_counter()
            self._expire(now)
            if now >= tick_at:
                tick_at = now + 1.0
                self._tick(now - t0)
        report.elapsed_s = time.perf_counter() - t0

    def _send(self, sock: zmq.Socket[Any]) -> None:
        spec = self.spec
        kind = spec.kinds[self.report.sent % len(spec.kinds)]
        items = self.sources[kind].take(spec.items)
        rid = self.report.sent + 1  # request ids are 1, 2, 3... in send order
        sock.send_multipart(embed_frames(rid, KIND_LANE[kind], kind, items,
                                         normalize=spec.normalize, dtype=p.DTYPE_BF16,
                                         timeout_s=spec.timeout_s, input_type=None,
                                         priority=spec.priority))
        self._outstanding[rid] = time.perf_counter()
        self.report.sent = rid

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        report = self.report
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            rid, header = reply_id(frames)
            sent = self._outstanding.pop(rid, None) if rid is not None else None
            if sent is None:  # not outstanding: late (we gave up on it) or a second answer
                if rid in self._given_up:
                    self._given_up.discard(rid)
                    report.late += 1
                else:
                    report.duplicates += 1
                continue
            ms = (time.perf_counter() - sent) * 1000
            status = int(header.get("status", p.ENGINE_ERROR))
            if status != p.OK:
                report.statuses[status] += 1
                if status == p.OVERLOADED:
                    report.reject_ms.append(ms)
                    if not self.spec.rate:  # a closed-loop client backs off as told
                        back = max(int(header.get("retry_after_ms") or 1), 1) / 1000
                        heapq.heappush(self._parked, time.perf_counter() + back)
                continue
            report.latencies_ms.append(ms)
            report.ok += 1
            report.items_ok += int(header["shape"][0])
            report.cached_items += int(header.get("cached", 0))
            report.item_errors += len(header.get("item_errors") or ())

    def _expire(self, now: float) -> None:
        """Requests unanswered past the client timeout count as status 0 (no answer)."""
        limit = now - self.spec.timeout_s
        while self._outstanding:
            rid, sent = next(iter(self._outstanding.items()))  # oldest first (insertion order)
            if sent > limit:
                return
            del self._outstanding[rid]
            self._given_up.add(rid)
            self.report.statuses[NO_ANSWER] += 1

    def _tick(self, secs: float) -> None:
        if self.progress:
            show_progress(self.report, secs)


def show_progress(r: BenchReport, secs: float) -> None:
    """The one-line progress both load generators rewrite on stderr each second."""
    sys.stderr.write(f"\r{secs:6.1f}s sent {r.sent} ok {r.ok} ({r.ok / secs:.0f}/s, "
                     f"{r.items_ok / secs:.0f} items/s) 429 {r.rejected} "
                     f"errors {r.errors}   ")
    sys.stderr.flush()


def served_engines(endpoint: str, curve: tuple[str, str] = ("", ""),
                   timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """Lane -> one live engine's entry in the broker's stats (what it announced in READY).

    Empty when the broker cannot be asked; lanes without an engine are left out.
    """
    from zembed.client import Client
    from zembed.errors import ZembedError

    try:
        with Client(endpoint, timeout=timeout_s, curve_secret_key=curve[0],
                    curve_server_key=curve[1]) as client:
            snap = client.stats(timeout=timeout_s)
    except (ZembedError, zmq.ZMQError, OSError, ValueError):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for lane, view in (snap.get("lanes") or {}).items():
        engines = [e for e in view.get("engines") or [] if isinstance(e, dict)]
        alive = [e for e in engines if e.get("alive")] or engines
        if alive:
            out[str(lane)] = alive[0]
    return out


def run(endpoint: str, spec: BenchSpec, *, raw: bool, config_file: str | None,
        progress: bool, curve: tuple[str, str] = ("", ""),
        load: Callable[[], BenchReport] | None = None, via: str = "") -> dict[str, Any]:
    """Raw limits (when asked) then the served run; one dict with everything.

    The raw model is the one the lane's engine announced (from the broker's stats), not
    whatever the local config names: see :func:`zembed.tools.raw.engine_config`. A model that
    cannot be loaded here stops the run with one line saying what to pass.

    ``load`` runs the served part instead of a :class:`Bench` on ``endpoint`` (``zembed bench
    --http`` passes an :class:`~zembed.tools.httpbench.HttpBench`'s ``run``; ``via`` names
    its URL); the raw limits still come from ``endpoint``'s engines, so both modes are
    measured against the same limits.
    """
    out: dict[str, Any] = {"spec": {k: v for k, v in vars(spec).items()}}
    if raw:
        from zembed.tools import raw as rawmod

        engines = served_engines(endpoint, curve)
        limits: dict[str, Any] = {}
        for kind in spec.kinds:  # transport first: torch's idle threads would disturb it
            dim = 384 if kind == p.KIND_TEXT else 512
            limits[kind] = {"zmq": rawmod.zmq_round_trip(
                kind, spec.items, max(1, spec.concurrency * spec.window), 3.0, dim=dim)}
        for kind in spec.kinds:
            batches = sorted({spec.items, 32 if kind == p.KIND_TEXT else 16})
            limits[kind].update(rawmod.model_forward(kind, batches, 3.0, config_file,
                                                     engines.get(KIND_LANE[kind])))
        out["raw"] = limits
    report = load() if load is not None else Bench(endpoint, spec, progress, curve).run()
    out["served"] = report.summary()
    out["curve"] = bool(curve[0])
    if via:
        out["via"] = via
    return out


def render(result: dict[str, Any]) -> str:
    """Human-readable report, served figures beside raw limits as ratios."""
    s = result["served"]
    spec = result["spec"]
    lines = [
        f"kinds {','.join(spec['kinds'])}, {spec['items']} item(s)/request, "
        + (f"open loop {spec['rate']:.0f} req/s" if spec["rate"] else
           f"closed loop {spec['concurrency']}x{spec['window']} in flight")
        + f", repeat {spec['repeat']:.0%}"
        + (f", through the gateway at {result['via']}" if result.get("via") else ""),
        f"sent {s['sent']}, ok {s['ok']} ({s['success_pct']}%), 429 {s['rejected_429']} "
        f"({s['rejected_pct']}%), errors {s['errors']} {s['errors_by_status'] or ''}",
        f"throughput: {s['requests_per_s']} requests/s, {s['items_per_s']} items/s",
        "latency ms: " + ", ".join(f"{k} {v}" for k, v in s["latency_ms"].items()),
        "time to 429 ms: " + ", ".join(f"{k} {v}" for k, v in s["time_to_429_ms"].items()),
        f"cache hit ratio: {s['cache_hit_ratio']}, item errors: {s['item_errors']}",
    ]
    for kind, limits in result.get("raw", {}).items():
        z = limits["zmq"]
        line = (f"raw {kind}: bare ZeroMQ {z['round_trips_per_s']:.0f} round trips/s "
                f"(p50 {z['p50_ms']:.3f} ms)")
        if (s["cache_hit_ratio"] or 0) >= 0.99:  # only an all-hit run is bounded by transport
            line += f" -> served requests/s / raw {s['requests_per_s'] / z['round_trips_per_s']:.2f}"
        lines.append(line)
        if "model_mismatch" in limits:
            lines.append(f"raw {kind}: NOTE {limits['model_mismatch']}")
        forward = {k: v for k, v in limits.items() if k.startswith("forward")}
        for key, value in forward.items():
            lines.append(f"raw {kind}: {key} {value:.1f}")
        if forward and (s["cache_hit_ratio"] or 0) < 0.99:
            best_key = max(forward, key=lambda k: int(k.split("@")[1]))
            limit = forward[best_key]
            if "decode_preprocess_per_s" in limits:
                lines.append(f"raw {kind}: decode_preprocess_per_s "
                             f"{limits['decode_preprocess_per_s']:.1f} (one thread)")
                limit = min(limit, limits["decode_preprocess_per_s"])
            lines.append(f"served items/s / raw limit ({best_key.split('@')[1]}-batch forward"
                         f"{', decode' if 'decode_preprocess_per_s' in limits else ''}): "
                         f"{s['items_per_s'] / limit:.2f}")
    return "\n".join(lines)

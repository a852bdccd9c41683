"""``zembed stats``: a live terminal dashboard of the broker's stats snapshots.

Rates are differences of the broker's monotonic counters between two snapshots, divided by
the difference of their ``uptime_s``; a broker restart (a new ``started_at``) starts the rates
over. Drawing is plain ANSI: the frame is rewritten in place from the top-left corner, each
line cleared to its end, so the terminal never scrolls. ``render`` is a pure function of
snapshots, so it is tested without a terminal.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any, TextIO

from zembed.tools.statsource import SnapshotSource

SPARK = "▁▂▃▄▅▆▇█"
#: Points of requests/s history per lane in the sparkline.
HISTORY = 30
_HOME, _CLEAR_EOL, _CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"
_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def sparkline(values: list[float]) -> str:
    """Block characters scaled to the largest value (all lowest when everything is 0)."""
    top = max(values, default=0.0)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
                   for v in values)


def _total(counts: dict[str, int]) -> int:
    return sum(counts.values())


def lane_rates(prev: dict[str, Any] | None, cur: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per lane, per-second rates between two snapshots of one broker life ({} otherwise)."""
    if prev is None or prev.get("broker", {}).get("started_at") != \
            cur.get("broker", {}).get("started_at"):
        return {}
    dt = cur["uptime_s"] - prev["uptime_s"]
    if dt <= 0:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, lane in cur["lanes"].items():
        before = prev["lanes"].get(name)
        if before is None:
            continue
        req = {s: n - before["requests"].get(s, 0) for s, n in lane["requests"].items()}
        hits = _total(lane["cache_hits"]) - _total(before["cache_hits"])
        misses = _total(lane["cache_misses"]) - _total(before["cache_misses"])
        out[name] = {
            "requests": sum(req.values()) / dt,
            "ok": req.get("200", 0) / dt,
            "rejected": req.get("429", 0) / dt,
            "errors": sum(n for s, n in req.items() if s not in ("200", "429")) / dt,
            "items": (lane["items"].get("200", 0) - before["items"].get("200", 0)) / dt,
            "hit_ratio": hits / (hits + misses) if hits + misses else float("nan"),
            "bytes_in": (lane["bytes_in"] - before["bytes_in"]) / dt,
            "bytes_out": (lane["bytes_out"] - before["bytes_out"]) / dt,
        }
    return out


def _ms(latency: dict[str, Any], q: str) -> str:
    value = latency.get(q)
    return "-" if value is None else f"{value:.1f}"


def _hit_ratio(lane: dict[str, Any], rate: dict[str, float] | None) -> str:
    if rate is not None and rate["hit_ratio"] == rate["hit_ratio"]:  # not NaN
        return f"{rate['hit_ratio'] * 100:.0f}%"
    hits, misses = _total(lane["cache_hits"]), _total(lane["cache_misses"])
    return f"{hits / (hits + misses) * 100:.0f}%*" if hits + misses else "-"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}d{s % 86400 // 3600:02d}h" if s >= 86400 else \
        f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def header_lines(snap: dict[str, Any], where: str) -> list[str]:
    broker = snap.get("broker", {})
    loop = broker.get("loop", {})
    cache = snap.get("cache", {})
    cache_text = cache.get("backend", "?") + ("" if cache.get("up", True) else " DOWN")
    nodes = cache.get("nodes")
    if isinstance(nodes, list) and nodes:  # Redis Cluster: masters answering / all
        cache_text += f" {sum(1 for n in nodes if n.get('up'))}/{len(nodes)} masters up"
    ready = "ready" if broker.get("ready") else \
        "NOT READY (missing: " + ", ".join(broker.get("missing", [])) + ")"
    return [
        f"zembed {snap.get('version', '?')}  broker {where}  up {_duration(snap['uptime_s'])}  "
        f"{ready}",
        f"loop {loop.get('utilisation', 0) * 100:.0f}% busy, longest turn "
        f"{loop.get('max_turn_ms', 0):.1f} ms, stalls {loop.get('stalls', 0)}  "
        f"clients {broker.get('connected_clients', '?')}  cache {cache_text} "
        f"(errors {cache.get('errors', 0)})  in flight {snap.get('in_flight', 0)}",
    ]


_COLUMNS = (f"{'LANE':<7}{'ENG':>5}{'CREDITS':>10}{'REQ/S':>9}{'OK/S':>9}{'429/S':>8}"
            f"{'ERR/S':>7}{'ITEMS/S':>9}{'P50ms':>8}{'P95ms':>8}{'P99ms':>8}{'HIT':>6}"
            f"{'IN kB/s':>9}{'OUT kB/s':>9}  REQ/S HISTORY")


def lane_line(name: str, lane: dict[str, Any], rate: dict[str, float] | None,
              history: deque[float]) -> str:
    engines = lane["engines"]
    live = sum(1 for e in engines if e.get("alive"))
    lat = lane.get("latency_ms", {})
    r = rate or {}

    def per_s(key: str, width: int, scale: float = 1.0) -> str:
        return f"{r[key] / scale:>{width}.1f}" if key in r else f"{'-':>{width}}"

    credits = f"{lane['credits_free']}/{lane['credits_total']}"
    return (f"{name:<7}{f'{live}/{len(engines)}':>5}{credits:>10}"
            f"{per_s('requests', 9)}{per_s('ok', 9)}{per_s('rejected', 8)}{per_s('errors', 7)}"
            f"{per_s('items', 9)}{_ms(lat, 'p50'):>8}{_ms(lat, 'p95'):>8}{_ms(lat, 'p99'):>8}"
            f"{_hit_ratio(lane, rate):>6}{per_s('bytes_in', 9, 1000)}"
            f"{per_s('bytes_out', 9, 1000)}  {sparkline(list(history))}")


def engine_line(e: dict[str, Any]) -> str:
    mean = e.get("mean_batch_size")
    mean_text = "-" if mean is None else f"{mean:.1f}"
    flags = "" if e.get("alive") else "  LATE HEARTBEAT"
    if e.get("random_weights"):
        flags += "  RANDOM WEIGHTS"
    control = e.get("adaptive")
    if isinstance(control, dict):
        flags += f"  limit {control.get('limit')} ({control.get('cuts', 0)} cuts)"
    brokers = e.get("brokers") or []
    if len(brokers) > 1:
        flags += f"  serves {e.get('serving', '?')} of {len(brokers)} brokers"
    sizing = e.get("sizing")
    if isinstance(sizing, dict):
        flags += (f"  sized: batch {sizing.get('max_batch')}, {sizing.get('credits')} credits,"
                  f" {sizing.get('threads')} thread(s)")
    return (f"  engine {e['id']}  pid {e.get('pid', '?')}  {e.get('model') or '?'}  "
            f"credits {e['credits_free']}/{e['credits_total']}  in flight "
            f"{e['items_in_flight']}  batches {e.get('batches', 0)} (mean {mean_text})  heartbeat "
            f"{e['heartbeat_age_s']:.1f}s ago  model {e['fingerprint']}{flags}")


def render(snap: dict[str, Any], rates: dict[str, dict[str, float]],
           history: dict[str, deque[float]], where: str, note: str = "") -> list[str]:
    """The dashboard's lines for one snapshot (rates and history from earlier ones)."""
    lines = header_lines(snap, where)
    if note:
        lines.append(note)
    lines += ["", _COLUMNS]
    for name, lane in snap["lanes"].items():
        lines.append(lane_line(name, lane, rates.get(name), history.get(name, deque())))
    lines.append("")
    for name, lane in snap["lanes"].items():
        lines.append(f"{name}: {lane['engines_registered']} engine(s) registered, "
                     f"{lane['engines_lost']} lost" + ("" if lane["engines"] else
                                                        "  -- no engine"))
        classes = lane.get("classes") or {}
        if classes:
            lines.append("  classes: " + ", ".join(
                f"{c} {v.get('admitted', 0)} admitted / {v.get('refused', 0)} refused"
                for c, v in sorted(classes.items()))
                + f"; {lane.get('bulk_reserve', 0)} credits kept from bulk")
        if lane.get("latency_target_ms"):
            p99 = (lane.get("latency_ms") or {}).get("p99")
            lines.append(f"  adaptive credits: target {lane['latency_target_ms']:g} ms, "
                         f"accepted p99 {_ms(lane.get('latency_ms') or {}, 'p99').strip()}"
                         f"{'' if p99 is None else ' ms'}, limit {lane.get('credits_limit')}"
                         f" of {lane['credits_total']} credits")
        lines += [engine_line(e) for e in lane["engines"]]
    lines.append("")
    lines.append("rates over the last interval; HIT* = since start (no lookups this interval);"
                 " Ctrl-C quits")
    return lines


class Dashboard:
    """Keeps the previous snapshot and the request-rate history between frames."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.prev: dict[str, Any] | None = None
        self.history: dict[str, deque[float]] = {}

    def frame(self, snap: dict[str, Any], note: str = "") -> list[str]:
        rates = lane_rates(self.prev, snap)
        if not rates and self.prev is not None:
            self.history.clear()  # a restarted broker: old history would mislead
        for name, rate in rates.items():
            self.history.setdefault(name, deque(maxlen=HISTORY)).append(rate["requests"])
        self.prev = snap
        return render(snap, rates, self.history, self.where, note)


def draw(out: TextIO, lines: list[str], tty: bool) -> None:
    if tty:
        out.write(_HOME + "".join(line + _CLEAR_EOL + "\n" for line in lines) + _CLEAR_EOS)
    else:
        out.write("\n".join(lines) + "\n\n")
    out.flush()


def run(source: SnapshotSource, *, out: TextIO = sys.stdout, frames: int | None = None,
        stale_s: float = 3.0) -> int:
    """Draw a frame per snapshot until Ctrl-C (or ``frames`` frames); returns an exit code."""
    board = Dashboard(source.where)
    tty = out.isatty()
    last: dict[str, Any] | None = None
    last_at = time.monotonic()
    drawn = 0
    if tty:
        out.write(_HIDE_CURSOR + "\x1b[2J")
    try:
        while frames is None or drawn < frames:
            snap = source.next(timeout_s=stale_s)
            if snap is not None:
                last, last_at = snap, time.monotonic()
                draw(out, board.frame(snap), tty)
                drawn += 1
                continue
            silent = time.monotonic() - last_at
            note = (f"!! no snapshot from {source.where} for {silent:.0f} s: broker down, "
                    "stats socket off or elsewhere?")
            draw(out, render(last, {}, board.history, source.where, note) if last else
                 [f"waiting for a snapshot from {source.where} ... ({silent:.0f} s)"], tty)
    except KeyboardInterrupt:
        pass
    finally:
        if tty:
            out.write(_SHOW_CURSOR)
            out.flush()
    return 0

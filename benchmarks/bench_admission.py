"""Admission under overload (issue 15): adaptive credits against fixed ones, and retry tickets.

Starts its own stack on free loopback ports: a broker (text lane, ``--cache off``) and one text
engine (batch 32, one torch thread), restarted for each setting. In one run:

**credits** — the lane's capacity is measured first (a closed loop of 8-item requests, 8 in
flight, honouring ``retry_after``, on 64 fixed credits). Then, for fixed credits of 16, 64 and
256 and for adaptive credits (the engine announces 256, the broker gets
``--latency-target-ms``), an open loop of 8-item requests at twice that capacity
(``zembed bench --rate`` in a process of its own) for ``--seconds``. Reported: the accepted
requests' p50/p99 latency (against the target), goodput (items answered per second) against
the capacity, 429 share, and the credits the engine was held to (median of the samples taken
every 0.5 s while the load ran; for fixed credits, what it announced).

**turns** — 8 closed-loop clients x 32 items on the engine's default-era setting (64 credits,
batch 32), each honouring ``retry_after`` with the SDK's jitter, with the broker's retry
tickets and without them (the same loop, never sending a ticket). Reported: p50, p99 and max
of the time from a request's first attempt to its answer, and items/s.

**fastpath** — time to 429 with the engine frozen (SIGSTOP) and its 64 credits held: 2,000
one-item requests without a ticket, 2,000 asking for one (``ticket: 0``: each refusal adds a
ticket to the line), and 2,000 ``ping`` round trips as the transport floor of the same run.

Every load is bounded by ``--seconds`` and every process is stopped at the end. Usage::

    .venv/bin/python benchmarks/bench_admission.py [--seconds 10] [--targets-ms 500,1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from stacks import TextLane, machine

from zembed import protocol as p
from zembed.client import Client
from zembed.client.codec import retry_delay
from zembed.errors import Overloaded
from zembed.tools.bench import Bench, BenchSpec

ITEMS = 8
BATCH = 32


class Stack(TextLane):
    """A broker and one text engine, both restartable with other settings."""

    def __init__(self) -> None:
        super().__init__("bench_admission.")

    def restart(self, credits: int, target_ms: float | None = None) -> None:
        self.stop("text")
        self.stop("broker")
        self.start_broker(target_ms=target_ms)
        self.spawn("text", "start", "text", "--broker", self.be, "--threads", "1",
                   "--credits", str(credits), "--max-batch", str(BATCH))
        self.wait_ready(self.fe)
        Bench(self.fe, BenchSpec(items=ITEMS, concurrency=8, duration_s=2.0),
              progress=False).run()  # warm the engine's kernels


def sample_limits(endpoint: str, stop: threading.Event, out: list[int]) -> None:
    with Client(endpoint, timeout=2.0, retries=0) as c:
        while not stop.wait(0.5):
            with contextlib.suppress(Exception):  # a missed sample is only a missed sample
                out.append(int(c.stats(timeout=1.0)["lanes"]["text"]["credits_limit"]))


def overload(stack: Stack, rate: float, seconds: float) -> dict[str, Any]:
    """An open loop at ``rate`` requests/s of ``ITEMS`` items; the engine's limits sampled."""
    stop, limits = threading.Event(), []
    sampler = threading.Thread(target=sample_limits, args=(stack.fe, stop, limits))
    sampler.start()
    proc = subprocess.run(
        [sys.executable, "-m", "zembed", "bench", "--endpoint", stack.fe, "--items", str(ITEMS),
         "--rate", f"{rate:.2f}", "--duration-s", str(seconds), "--json"],
        capture_output=True, text=True, timeout=seconds + 120, check=True)
    stop.set()
    sampler.join()
    served = json.loads(proc.stdout)["served"]
    served["credits_median"] = int(np.median(limits)) if limits else None
    return served


def credits_part(stack: Stack, seconds: float, targets_ms: list[float]) -> dict[str, Any]:
    stack.restart(64)
    spec = BenchSpec(items=ITEMS, concurrency=8, duration_s=seconds)
    capacity = float(Bench(stack.fe, spec, progress=False).run().summary()["items_per_s"])
    rate = 2 * capacity / ITEMS
    rows: dict[str, Any] = {}
    settings: list[tuple[str, int, float | None]] = [
        ("fixed 16", 16, None), ("fixed 64", 64, None), ("fixed 256", 256, None)]
    settings += [(f"adaptive (ceiling 256), target {t:g} ms", 256, t) for t in targets_ms]
    for name, credits, target in settings:
        stack.restart(credits, target)
        rows[name] = overload(stack, rate, seconds)
        print(f"credits: {name} done", file=sys.stderr, flush=True)
    return {"capacity_items_per_s": capacity, "rows": rows}


def closed_loop(endpoint: str, tickets: bool, seconds: float, clients: int,
                items: int) -> dict[str, Any]:
    """``clients`` threads, each one request of ``items`` at a time, retrying 429s after
    ``retry_after`` with the SDK's jitter; with or without the broker's tickets."""
    took: list[float] = []
    done_items = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run(who: int) -> None:
        with Client(endpoint, timeout=60.0, retries=0) as c:
            i = 0
            while time.monotonic() < end:
                texts = [f"client {who} request {i} item {k}" for k in range(items)]
                first, ticket = time.perf_counter(), 0 if tickets else None
                while True:
                    pending = c.submit(p.LANE_TEXT, p.KIND_TEXT, texts, ticket=ticket)
                    try:
                        c.result(pending)
                        break
                    except Overloaded as exc:
                        if tickets and exc.ticket is not None:
                            ticket = exc.ticket
                        time.sleep(retry_delay(exc, 0, 0.05) or 0.01)
                with lock:
                    took.append((time.perf_counter() - first) * 1000)
                    done_items[0] += items
                i += 1

    t0 = time.perf_counter()
    workers = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    ms = np.array(took) if took else np.array([np.nan])
    return {"requests": len(took), "items_per_s": done_items[0] / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def turns_part(stack: Stack, seconds: float) -> dict[str, Any]:
    stack.restart(64)
    rows = {}
    for tickets in (True, False):
        rows["tickets" if tickets else "no tickets"] = closed_loop(stack.fe, tickets, seconds,
                                                                   8, 32)
        print(f"turns: tickets={tickets} done", file=sys.stderr, flush=True)
    return rows


def fastpath(stack: Stack, count: int = 2000) -> dict[str, Any]:
    """Time to 429 with and without tickets, and ping round trips, in ms (p50, p99)."""
    stack.restart(64)
    engine = stack.procs["text"]
    out: dict[str, Any] = {}
    with Client(stack.fe, timeout=30.0, retries=0) as c:
        engine.send_signal(signal.SIGSTOP)
        try:
            held = c.submit(p.LANE_TEXT, p.KIND_TEXT, [f"hold {i}" for i in range(64)])
            time.sleep(0.05)
            for name, ticket in (("no ticket", None), ("ticket 0", 0)):
                lat = []
                for _ in range(count):
                    t0 = time.perf_counter()
                    try:
                        c.result(c.submit(p.LANE_TEXT, p.KIND_TEXT, ["refused"], ticket=ticket))
                    except Overloaded:
                        lat.append((time.perf_counter() - t0) * 1000)
                out[name] = lat
            pings = []
            for _ in range(count):
                t0 = time.perf_counter()
                c.ping()
                pings.append((time.perf_counter() - t0) * 1000)
            out["ping"] = pings
        finally:
            engine.send_signal(signal.SIGCONT)
        c.result(held)
    return {k: {"n": len(v), "p50_ms": float(np.percentile(v, 50)),
                "p99_ms": float(np.percentile(v, 99))} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--targets-ms", default="500,1000",
                    help="The adaptive settings' latency targets, comma-separated.")
    ap.add_argument("--only", choices=("credits", "turns", "fastpath"), default=None)
    args = ap.parse_args()
    stack = Stack()
    credits = turns = fast = None
    try:
        if args.only in (None, "fastpath"):
            fast = fastpath(stack)
        if args.only in (None, "credits"):
            credits = credits_part(stack, args.seconds,
                                   [float(t) for t in args.targets_ms.split(",")])
        if args.only in (None, "turns"):
            turns = turns_part(stack, args.seconds)
    finally:
        stack.close()
    print(f"machine: {machine()}; {args.seconds:g} s per phase; engine batch {BATCH}, 1 thread")
    if fast is not None:
        print("\ntime to 429, engine frozen, 64 credits held (client-measured):")
        print("\n| request | n | p50 ms | p99 ms | p99 / ping p99 |")
        print("|---|---|---|---|---|")
        ping99 = fast["ping"]["p99_ms"]
        for name, r in fast.items():
            print(f"| {name} | {r['n']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                  f"{r['p99_ms'] / max(ping99, 1e-9):.2f} |")
    if credits is not None:
        cap = credits["capacity_items_per_s"]
        print(f"\ncapacity (closed loop, {ITEMS}-item requests, 64 credits): {cap:.0f} items/s;"
              f" load: open loop at 2x ({2 * cap / ITEMS:.1f} requests/s)")
        print("\n| credits | accepted p50 ms | accepted p99 ms | goodput / capacity | 429 % | "
              "credits held (median) |")
        print("|---|---|---|---|---|---|")
        for name, r in credits["rows"].items():
            lat = r["latency_ms"]
            print(f"| {name} | {lat['p50']:.0f} | {lat['p99']:.0f} | "
                  f"{r['items_per_s'] / max(cap, 1e-9):.2f} | {r['rejected_pct'] or 0:.1f} | "
                  f"{r['credits_median']} |")
    if turns is not None:
        print("\n8 closed-loop clients x 32 items, honouring retry_after (SDK jitter), "
              "64 credits:")
        print("\n| retries | requests | items/s | p50 ms | p99 ms | max ms | p99 / p50 |")
        print("|---|---|---|---|---|---|---|")
        for name, r in turns.items():
            print(f"| {name} | {r['requests']} | {r['items_per_s']:.0f} | {r['p50_ms']:.0f} | "
                  f"{r['p99_ms']:.0f} | {r['max_ms']:.0f} | "
                  f"{r['p99_ms'] / max(r['p50_ms'], 1e-9):.1f} |")


if __name__ == "__main__":
    main()

"""Search queries beside a bulk flood (issue 15): with request classes, and with one pool.

Starts its own stack on free loopback ports: a broker (text lane, ``--cache off``) and one text
engine with default settings (64 credits). Then, for the broker's ``--bulk-reserve`` of 0.25
(the default: bulk requests may not take a quarter of the credits) and of 0 (one pool, as
before request classes), in one run:

1. **idle**: one-item queries at ``--qps`` (10/s) alone: their p50/p99 latency;
2. **capacity**: a closed loop of 16-item bulk requests (what ``embed_many`` sends), 8 in
   flight, honouring ``retry_after``, measures the lane's items/s;
3. **flood** at 2x and 5x that capacity: an open loop of 16-item bulk requests
   (``zembed bench --priority bulk`` in a process of its own) while the queries run again.
   Reported: the queries' p50/p99 and refusals, and total goodput (bulk and query items
   answered per second) against the capacity.

Queries are sent by a client that never retries, so every refusal shows. Every load is
bounded by ``--seconds`` and every process is stopped at the end. Usage::

    .venv/bin/python benchmarks/bench_priority.py [--seconds 10] [--qps 10] [--target-ms 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from stacks import TextLane, machine

from zembed.client import Client
from zembed.errors import Overloaded, ZembedError
from zembed.tools.bench import Bench, BenchSpec

#: What embed_many sends under the default reserve (a bulk share of 48: 16-item requests,
#: three in flight, pairing into full batches of 32).
BULK_ITEMS = 16


class Stack(TextLane):
    """A broker and one text engine; the broker can be restarted with another reserve."""

    def __init__(self) -> None:
        super().__init__("bench_priority.")


def queries(endpoint: str, qps: float, seconds: float) -> dict[str, Any]:
    """One-item queries at a steady rate, never retried: latencies of the answered ones."""
    lat: list[float] = []
    refused = errors = 0
    with Client(endpoint, timeout=5.0, retries=0) as c:
        t0 = time.perf_counter()
        for i in range(int(qps * seconds)):
            due = t0 + i / qps
            time.sleep(max(0.0, due - time.perf_counter()))
            start = time.perf_counter()
            try:
                c.embed_texts([f"red running shoes size {i % 50}"], priority="interactive")
                lat.append((time.perf_counter() - start) * 1000)
            except Overloaded:
                refused += 1
            except ZembedError:
                errors += 1
        elapsed = time.perf_counter() - t0
    ms = np.array(lat) if lat else np.array([np.nan])
    return {"answered": len(lat), "refused": refused, "errors": errors,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "items_per_s": len(lat) / elapsed}


def flood(endpoint: str, rate: float, seconds: float) -> subprocess.Popen[str]:
    """An open loop of bulk requests in a process of its own (so it never shares our GIL)."""
    return subprocess.Popen(
        [sys.executable, "-m", "zembed", "bench", "--endpoint", endpoint, "--priority", "bulk",
         "--items", str(BULK_ITEMS), "--rate", f"{rate:.2f}", "--duration-s", str(seconds),
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def one_setting(stack: Stack, reserve: float, seconds: float, qps: float,
                target_ms: float | None = None) -> dict[str, Any]:
    stack.stop("broker")
    stack.start_broker("--bulk-reserve", str(reserve), target_ms=target_ms)
    stack.wait_ready(stack.fe)
    out: dict[str, Any] = {"idle": queries(stack.fe, qps, seconds)}
    spec = BenchSpec(items=BULK_ITEMS, concurrency=8, duration_s=seconds, priority="bulk")
    capacity = float(Bench(stack.fe, spec, progress=False).run().summary()["items_per_s"])
    out["capacity_items_per_s"] = capacity
    for mult in (2, 5):
        proc = flood(stack.fe, mult * capacity / BULK_ITEMS, seconds + 1.0)
        time.sleep(1.0)  # the flood is under way
        q = queries(stack.fe, qps, seconds)
        stdout, _ = proc.communicate(timeout=seconds + 60)
        bulk = json.loads(stdout)["served"]
        q["bulk_items_per_s"] = bulk["items_per_s"]
        q["bulk_rejected_pct"] = bulk["rejected_pct"]
        q["goodput_ratio"] = (bulk["items_per_s"] + q["items_per_s"]) / max(capacity, 1e-9)
        out[f"{mult}x"] = q
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--qps", type=float, default=10.0, help="Queries per second.")
    ap.add_argument("--target-ms", type=float, default=0.0,
                    help="Also run classes with adaptive credits at this latency target.")
    args = ap.parse_args()
    stack = Stack()
    results: dict[str, dict[str, Any]] = {}
    settings: list[tuple[str, float, float | None]] = [
        ("0.25 (classes)", 0.25, None), ("0 (one pool)", 0.0, None)]
    if args.target_ms:
        settings.insert(1, (f"0.25 (classes), adaptive {args.target_ms:g} ms", 0.25,
                            args.target_ms))
    try:
        stack.start_broker("--bulk-reserve", "0.25")
        stack.spawn("text", "start", "text", "--broker", stack.be)
        stack.wait_ready(stack.fe)
        Bench(stack.fe, BenchSpec(items=8, concurrency=8, duration_s=2.0),
              progress=False).run()  # warm-up
        for name, reserve, target in settings:
            results[name] = one_setting(stack, reserve, args.seconds, args.qps, target)
            print(f"{name}: done", file=sys.stderr, flush=True)
    finally:
        stack.close()
    print(f"machine: {machine()}; {args.qps:g} queries/s, "
          f"{args.seconds:g} s per phase, bulk requests of {BULK_ITEMS} items")
    print("\n| bulk reserve | load | capacity items/s | query p50 ms | query p99 ms | "
          "queries refused | bulk 429 % | goodput / capacity |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        idle = r["idle"]
        print(f"| {name} | idle | {r['capacity_items_per_s']:.0f} | {idle['p50_ms']:.1f} | "
              f"{idle['p99_ms']:.1f} | {idle['refused']}/{idle['answered'] + idle['refused']} "
              f"| | |")
        for mult in ("2x", "5x"):
            q = r[mult]
            print(f"| {name} | bulk flood {mult} | | {q['p50_ms']:.1f} | {q['p99_ms']:.1f} | "
                  f"{q['refused']}/{q['answered'] + q['refused']} | "
                  f"{q['bulk_rejected_pct'] or 0:.1f} | {q['goodput_ratio']:.2f} |")


if __name__ == "__main__":
    main()

"""embed_many against the lane's capacity: one Python process indexing a corpus, sync and async.

One run, one stack (a broker with the cache off and one text engine with its defaults):

1. **Capacity**: ``zembed bench``'s closed loop of unique texts (its own inputs, 8-16 words),
   32 items per request, with 2 and with 4 workers; the better of the two is the lane's
   capacity on this stack, in items/s.
2. **embed_many** (sync ``Client``) over ``--items`` unique texts of the same kind, from a
   generator; items/s and the ratio to capacity. Target: 0.9 or more.
3. The same through ``AsyncClient.embed_many``.
4. **Under pressure**: while another process runs ``zembed bench`` at 4 workers x 2 requests
   in flight (more than the lane's credits, so the lane answers 429s), ``embed_many`` over
   ``--items / 4`` texts: failed items (must be 0), rows that came back empty (must be 0), the
   429s the broker answered meanwhile, and the share of the lane embed_many got.

Usage::

    .venv/bin/python benchmarks/bench_embed_many.py [--items 100000] [--capacity-s 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
from stacks import text_stack

from zembed import protocol as p
from zembed.client import AsyncClient, Client
from zembed.tools.bench import Bench, BenchSpec
from zembed.tools.inputs import InputSource


def capacity(endpoint: str, seconds: float) -> dict[str, Any]:
    """The lane's items/s under zembed bench's closed loop, the better of 2 and 4 workers."""
    runs = {}
    for workers in (2, 4):
        spec = BenchSpec(kinds=(p.KIND_TEXT,), items=32, concurrency=workers,
                         duration_s=seconds)
        runs[workers] = Bench(endpoint, spec, progress=False).run().summary()
    best = max(runs.values(), key=lambda r: r["items_per_s"])
    return {"items_per_s": best["items_per_s"],
            "by_workers": {w: r["items_per_s"] for w, r in runs.items()}}


def corpus(n: int, seed: int) -> Iterator[str]:
    """``n`` unique texts like the bench's own (8-16 words each), generated as consumed."""
    source = InputSource(p.KIND_TEXT, 0.0, seed=seed)
    for _ in range(n // 256):
        yield from source.take(256)
    yield from source.take(n % 256)


def timed_sync(endpoint: str, n: int, seed: int) -> dict[str, Any]:
    failed: list[int] = []
    with Client(endpoint, timeout=30) as client:
        t0 = time.perf_counter()
        vectors = client.embed_many(corpus(n, seed),
                                    on_item_error=lambda i, s, m: failed.append(i))
        seconds = time.perf_counter() - t0
    return summary(vectors, n, seconds, failed)


def timed_async(endpoint: str, n: int, seed: int) -> dict[str, Any]:
    failed: list[int] = []

    async def run() -> tuple[Any, float]:
        async with AsyncClient(endpoint, timeout=30) as client:
            t0 = time.perf_counter()
            vectors = await client.embed_many(corpus(n, seed),
                                              on_item_error=lambda i, s, m: failed.append(i))
            return vectors, time.perf_counter() - t0

    vectors, seconds = asyncio.run(run())
    return summary(vectors, n, seconds, failed)


def summary(vectors: Any, n: int, seconds: float, failed: list[int]) -> dict[str, Any]:
    empty = int((~np.abs(vectors).any(axis=1)).sum()) if len(vectors) else n
    return {"items": len(vectors), "seconds": round(seconds, 2),
            "items_per_s": round(n / seconds, 1), "failed_items": len(failed),
            "empty_rows": empty, "shape_ok": vectors.shape == (n, 384)}


def lane_counts(endpoint: str) -> tuple[int, int]:
    """(429s answered, items answered 200) on the text lane so far."""
    with Client(endpoint, timeout=5) as client:
        lane = client.stats()["lanes"]["text"]
    return int(lane["requests"][str(p.OVERLOADED)]), int(lane["items"][str(p.OK)])


def under_pressure(endpoint: str, config: str, n: int) -> dict[str, Any]:
    """embed_many while another process keeps the lane past its credits."""
    load = subprocess.Popen(
        [sys.executable, "-m", "zembed", "bench", "--config", config, "--kind", "text",
         "--items", "32", "--concurrency", "4", "--window", "2", "--duration-s", "3600",
         "--requests", "1000000000", "--json"], stdout=subprocess.DEVNULL)
    time.sleep(3)  # the other client has the lane first
    refused0, items0 = lane_counts(endpoint)
    try:
        result = timed_sync(endpoint, n, seed=7)
        refused1, items1 = lane_counts(endpoint)
    finally:
        load.terminate()
        load.wait(60)
    result["lane_429s_meanwhile"] = refused1 - refused0
    result["other_client_items_per_s"] = round((items1 - items0 - n) / result["seconds"], 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--capacity-s", type=float, default=15.0)
    args = ap.parse_args()
    out: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, "
                                      f"{os.cpu_count()} cores", "items": args.items}
    with text_stack() as (endpoint, config):
        Bench(endpoint, BenchSpec(items=32, concurrency=2, duration_s=3), progress=False).run()
        out["capacity"] = capacity(endpoint, args.capacity_s)
        out["embed_many_sync"] = timed_sync(endpoint, args.items, seed=3)
        out["embed_many_async"] = timed_async(endpoint, args.items, seed=5)
        out["under_pressure"] = under_pressure(endpoint, config, args.items // 4)
    cap = out["capacity"]["items_per_s"]
    for key in ("embed_many_sync", "embed_many_async"):
        out[key]["vs_capacity"] = round(out[key]["items_per_s"] / cap, 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

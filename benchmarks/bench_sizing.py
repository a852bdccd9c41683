"""Warm-up sizing against the old fixed defaults: raw forward limit and served items/s.

In one run, on this machine:

a. **raw**: the text model in this process, no broker, no sockets: the items/s curve of
   forward passes of the warm-up text (19 tokens) with 1 thread and with every core, and its
   best point (the most a served engine could give with that many threads);
b. **sized**: a broker (cache off) and a text engine with the defaults (``credits``,
   ``max_batch`` and ``threads`` all sized at warm-up), loaded by 8 closed-loop clients each
   sending 32-item requests and honouring ``retry_after`` (the SDK's retries);
c. **fixed**: the same load on the old defaults: 1 thread, batch 32, 64 credits;
d. **sized, 2 threads**: sized defaults with ``--threads 2`` (both cores of a 2-core machine);
e. **sized, 1 thread**: sized batch and credits with ``--threads 1``, to tell the thread choice
   from the batch and credit choice;
f. **sized, 64 credits**: sized batch and threads with the old ``--credits 64``, to tell the
   credit rule (twice the batch) from the rest.

The clients run on the same machine as the broker and the engine (on a 2-core machine they
compete with both for the cores), as in the other benchmarks here.

Each served phase prints items/s, its ratio to the raw best point at its thread count, the
mean batch the engine ran, p50/p99 request latency and the engine's sizing. Every phase is
bounded by ``--seconds``; every process is stopped at the end. Usage::

    .venv/bin/python benchmarks/bench_sizing.py [--seconds 8]   # ~2.5 min on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import threading
import time
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from stacks import Children, machine

from zembed.client import Client
from zembed.errors import ZembedError
from zembed.tools.net import free_port

CLIENTS = 8
#: Items per request, unless the engine's credits (the lane's ``max_request_items``) are fewer.
ITEMS = 32
TEXT = "A short product title with a few words, about as long as a search query."


def raw_curves() -> dict[int, list[Any]]:
    """In-process items/s curves (batch 1..128) with 1 thread and with every core."""
    import torch

    from zembed import protocol as p
    from zembed.config import TextEngineConfig
    from zembed.engines.devices import available_cores
    from zembed.engines.sizing import candidate_sizes, measure_curve
    from zembed.engines.text import TextModel

    model = TextModel(TextEngineConfig(threads=1))
    ids = model.prepare(p.KIND_TEXT, [TEXT], None)[0]

    def run_pass(n: int) -> None:
        model.forward(p.KIND_TEXT, [ids] * n)

    curves: dict[int, list[Any]] = {}
    for threads in sorted({1, available_cores()}):
        torch.set_num_threads(threads)
        curves[threads] = measure_curve(run_pass, candidate_sizes("cpu", 128), budget_s=1.0)
    return curves


def closed_loop(endpoint: str, seconds: float, items: int) -> dict[str, Any]:
    """``CLIENTS`` threads, each a client sending ``items``-item requests back to back.

    Every text is new (a counter after the warm-up text, still its 24-token bucket): the
    broker runs identical in-flight items once (single-flight), which would flatter the figure.
    """
    counter = itertools.count()
    lat: list[float] = []
    done = [0]
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker() -> None:
        with Client(endpoint, timeout=30.0) as c:  # retries on: 429s wait for retry_after
            while time.perf_counter() < stop_at:
                texts = [f"{TEXT} {next(counter)}" for _ in range(items)]
                t0 = time.perf_counter()
                try:
                    c.embed_texts(texts)
                except ZembedError:
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    lat.append((time.perf_counter() - t0) * 1000)
                    done[0] += items

    t0 = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 60)
    elapsed = time.perf_counter() - t0
    ms = np.array(lat) if lat else np.array([np.nan])
    return {"items_per_s": done[0] / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": errors[0]}


def engine_view(endpoint: str) -> dict[str, Any]:
    with Client(endpoint, timeout=5.0, retries=0) as c:
        engines: list[dict[str, Any]] = c.stats()["lanes"]["text"]["engines"]
        engine = engines[0]
        engine["max_request_items"] = c.info()["lanes"]["text"]["max_request_items"]
    return engine


def phase(kids: Children, fe: str, be: str, name: str, args: list[str],
          seconds: float) -> dict[str, Any]:
    """Start a text engine with ``args``, warm the stack, load it, stop the engine."""
    kids.spawn(name, "start", "text", "--broker", be, *args)
    kids.wait_ready(fe)
    # A request larger than the engine's credits can never be admitted (413): send at most that.
    items = min(ITEMS, int(engine_view(fe)["max_request_items"]))
    closed_loop(fe, 1.0, items)  # first requests of each size pay allocations
    before = engine_view(fe)
    t0 = time.perf_counter()
    out = closed_loop(fe, seconds, items)
    after = engine_view(fe)
    out["engine_items_per_s"] = (after["items_done"] - before["items_done"]) / (
        time.perf_counter() - t0)
    out["items"] = items
    batches = after["batches"] - before["batches"]
    out["mean_batch"] = (after["batch_items"] - before["batch_items"]) / batches if batches else 0
    out["sizing"] = after.get("sizing") or {}
    kids.stop(name)
    time.sleep(1.0)  # the broker drops the engine; the next one registers alone
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="load per served phase, s")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    curves = raw_curves()
    gc.collect()
    best = {}
    for threads, curve in curves.items():
        top = max(curve, key=lambda pt: pt.items_per_s)
        best[threads] = top.items_per_s
        print(f"raw, {threads} thread(s): best {top.items_per_s:.0f} items/s at batch "
              f"{top.batch}; curve " + " ".join(f"{pt.batch}:{pt.ms:.0f}ms/{pt.items_per_s:.0f}/s"
                                              for pt in curve))

    fe, be, st = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    kids = Children("bench_sizing.")
    try:
        kids.spawn("broker", "start", "broker", "--frontend", fe, "--backend", be,
                   "--stats-endpoint", st, "--lanes", "text", "--cache", "off")
        phases = [("sized", []),
                  ("fixed (1 thread, batch 32, 64 credits)",
                   ["--threads", "1", "--max-batch", "32", "--credits", "64"]),
                  ("sized, --threads 2", ["--threads", "2"]),
                  ("sized, --threads 1", ["--threads", "1"]),
                  ("sized batch and threads, --credits 64", ["--credits", "64"])]
        for i, (name, extra) in enumerate(phases):
            r = phase(kids, fe, be, f"text{i}", extra, args.seconds)
            s = r["sizing"]
            threads = int(s.get("threads", 1))
            raw = best.get(threads, float("nan"))
            print(f"{name}: {r['items']}-item requests, {r['items_per_s']:.0f} items/s served "
                  f"= {r['items_per_s'] / raw:.2f}x raw best at {threads} thread(s) (engine "
                  f"counted {r['engine_items_per_s']:.0f}/s); mean batch {r['mean_batch']:.1f}; "
                  f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms; errors {r['errors']}; "
                  f"engine: batch {s.get('max_batch')}, {s.get('credits')} credits, "
                  f"{threads} thread(s), auto {s.get('auto')}")
    finally:
        kids.close()
        print(f"logs: {kids.logs}")


if __name__ == "__main__":
    main()

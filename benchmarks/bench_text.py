"""Text lane through the broker versus the raw model, measured in one run on one machine.

Prints, for 1-item and 32-item requests: requests/s, items/s and p50/p99 latency through a
real broker and engine, each beside the raw in-process forward throughput of the same model at
the same batch size (same dtype and threads), as a ratio. Also: time from start to ready, the
broker's time-to-429 when the lane is out of credits, and a management round trip (transport
floor). Usage::

    .venv/bin/python benchmarks/bench_text.py [--threads 2] [--seconds 8] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zembed.client import Client
from zembed.config import TextEngineConfig
from zembed.errors import EngineUnavailable, Overloaded
from zembed.tools.net import free_port

WORDS = (
    "red", "blue", "light", "trail", "running", "shoes", "women", "men", "size", "cotton",
    "shirt", "summer", "winter", "jacket", "waterproof", "leather", "bag", "travel", "kitchen",
    "knife", "steel", "pan", "coffee", "grinder", "phone", "case", "charger", "cable", "fast",
    "wireless", "garden", "chair", "table", "lamp", "desk", "office", "ergonomic",
)


def sentences(n: int, seed: int = 7) -> list[str]:
    """Unique realistic-length inputs (~12 words), so nothing is repeated."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 16))) + f" #{i}" for i in range(n)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


class _Timed:
    """Wraps the modules after the Transformer and adds up the time spent in them."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner, self.seconds = inner, 0.0

    def __call__(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def raw_forward(threads: int, batch: int, seconds: float) -> tuple[float, float]:
    """(sentences/s of the engine's own model code in-process at ``batch``, the share of that
    time spent in the modules after the Transformer: pooling, Normalize, ...)."""
    from zembed.engines.text import TextModel

    model = TextModel(TextEngineConfig(threads=threads))
    texts = sentences(4096, seed=batch)
    model.encode(texts[:batch])
    timed = _Timed(model.post)
    model.post = timed  # type: ignore[assignment]
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.encode(texts[i:i + batch])
        i = (i + batch) % (len(texts) - batch)
        done += batch
    elapsed = time.perf_counter() - t0
    rate = done / elapsed
    del model
    gc.collect()
    return rate, timed.seconds / elapsed


def served(client: Client, items: int, window: int, seconds: float,
           seed: int) -> dict[str, float]:
    """Closed loop: keep ``window`` requests of ``items`` items in flight for ``seconds``."""
    texts = sentences(200_000, seed=seed)
    lat: list[float] = []
    pending: deque[tuple[float, Any]] = deque()
    sent = done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or pending:
        while len(pending) < window and time.perf_counter() - t0 < seconds:
            batch = texts[(sent * items) % (len(texts) - items):][:items]
            pending.append((time.perf_counter(), client.submit("text", "text", batch)))
            sent += 1
        start, pnd = pending.popleft()
        client.result(pnd)
        lat.append((time.perf_counter() - start) * 1000)
        done += 1
    elapsed = time.perf_counter() - t0
    return {"requests_per_s": done / elapsed, "items_per_s": done * items / elapsed,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "requests": done}


def time_to_429(client: Client, engine: subprocess.Popen[bytes], credits: int,
                count: int) -> dict[str, float]:
    """Freeze the engine, spend its credits, then time ``count`` rejections."""
    engine.send_signal(signal.SIGSTOP)
    try:
        # Requests of at most 64 items (the broker's default max_items) until none are left.
        # Distinct texts: the broker computes a repeated input once.
        held = [client.submit("text", "text", [f"hold {r} {i}" for i in range(64)])
                for r in range(credits // 64)]
        time.sleep(0.05)
        lat = []
        for _ in range(count):
            t0 = time.perf_counter()
            try:
                client.embed_texts(["rejected"])
            except Overloaded:
                lat.append((time.perf_counter() - t0) * 1000)
    finally:
        engine.send_signal(signal.SIGCONT)
    for pending in held:
        client.result(pending)
    return {"rejections": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}


def ping_rate(client: Client, seconds: float) -> dict[str, float]:
    lat = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        client.ping()
        lat.append((time.perf_counter() - s) * 1000)
    return {"round_trips_per_s": len(lat) / (time.perf_counter() - t0), "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99)}


def start_stack(threads: int, credits: int) -> tuple[list[subprocess.Popen[bytes]], str, float]:
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    z = [sys.executable, "-m", "zembed", "start"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*z, "broker", "--frontend", fe, "--backend", be, "--lanes", "text",
                              "--cache", "off", "--stats-endpoint", ""], **quiet),
             subprocess.Popen([*z, "text", "--broker", be, "--threads", str(threads),
                               "--credits", str(credits)], **quiet)]
    with Client(fe, timeout=1) as c:
        while True:
            try:
                if c.ready(timeout=1).get("ready"):
                    break
            except EngineUnavailable:  # the broker has not bound its socket yet
                pass
            if time.perf_counter() - t0 > 120:
                raise TimeoutError("stack not ready in 120 s")
            time.sleep(0.05)
    return procs, fe, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the raw run and the engine (0 = the engine default)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from zembed.engines.devices import default_threads

    threads = args.threads or default_threads()
    cores = len(os.sched_getaffinity(0))
    out: dict[str, Any] = {"threads": threads, "cores": cores}
    say: Callable[[str], None] = (lambda s: None) if args.json else print

    say(f"raw forward, {threads} thread(s), {args.seconds:.0f}s each ...")
    raw = {b: raw_forward(threads, b, args.seconds) for b in (1, 32)}
    out["raw"] = {b: rate for b, (rate, _) in raw.items()}
    out["modules_share"] = {b: share for b, (_, share) in raw.items()}
    out["raw_all_cores_32"] = raw_forward(cores, 32, args.seconds)[0]
    procs, fe, ready_s = start_stack(threads, credits=128)
    out["start_to_ready_s"] = ready_s
    try:
        with Client(fe, timeout=30, retries=0) as c:  # time_to_429 times each refusal
            served(c, 32, 1, 2.0, seed=99)  # warm the path
            out["ping"] = ping_rate(c, 2.0)
            out["served"] = {
                "1 item, 1 in flight": served(c, 1, 1, args.seconds, 1) | {"raw_batch": 1},
                "1 item, 64 in flight": served(c, 1, 64, args.seconds, 2) | {"raw_batch": 32},
                "32 items, 1 in flight": served(c, 32, 1, args.seconds, 3) | {"raw_batch": 32},
                "32 items, 4 in flight": served(c, 32, 4, args.seconds, 4) | {"raw_batch": 32},
            }
            out["time_to_429"] = time_to_429(c, procs[1], 128, 2000)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGCONT)
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    for row in out["served"].values():
        row["ratio_to_raw"] = row["items_per_s"] / out["raw"][row["raw_batch"]]
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"\nraw forward, {threads} thread(s) like the engine: {out['raw'][1]:.0f} sentences/s "
          f"at batch 1, {out['raw'][32]:.0f} at batch 32 ({out['raw_all_cores_32']:.0f} at "
          f"batch 32 on all {cores} cores, with nothing else running)")
    share = out["modules_share"]
    print(f"of which the modules after the Transformer (sentence-transformers' Pooling, "
          f"Normalize): {share[1]:.1%} at batch 1, {share[32]:.1%} at batch 32")
    print(f"start to ready (broker + text engine processes): {ready_s:.2f} s")
    pr = out["ping"]
    print(f"broker ping round trip: {pr['round_trips_per_s']:.0f}/s, p50 {pr['p50_ms']:.3f} ms, "
          f"p99 {pr['p99_ms']:.3f} ms")
    print(f"\n{'text requests':24} {'req/s':>8} {'items/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'raw@batch':>10} {'ratio':>6}")
    for name, r in out["served"].items():
        raw = out["raw"][r["raw_batch"]]
        print(f"{name:24} {r['requests_per_s']:8.1f} {r['items_per_s']:8.1f} {r['p50_ms']:8.2f} "
              f"{r['p99_ms']:8.2f} {raw:7.0f}@{r['raw_batch']:<2} {r['ratio_to_raw']:6.2f}")
    t = out["time_to_429"]
    print(f"\ntime to 429 (lane out of credits): p50 {t['p50_ms']:.3f} ms, "
          f"p99 {t['p99_ms']:.3f} ms over {t['rejections']} rejections")


if __name__ == "__main__":
    main()

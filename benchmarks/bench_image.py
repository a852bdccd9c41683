"""Image lane through the broker versus its raw limits, and text latency under image load.

One run, one machine: raw decode+preprocess of 640x480 JPEGs (with and without JPEG draft
mode, and what draft changes in the preprocessed pixels), raw ViT-B-32 forward (seeded random
weights: no CLIP weights can be downloaded here), images/s served end to end, and text
p50/p99 with the image lane idle and then saturated by a flood in another process. Usage::

    .venv/bin/python benchmarks/bench_image.py [--seconds 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import deque
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_text import free_port, pct

from zembed.client import AsyncClient, Client, Overloaded
from zembed.config import ImageEngineConfig
from zembed.engines.image import ImageModel, synthetic_jpeg
from zembed.errors import ZembedError

BATCH = 16
PHOTOS = [synthetic_jpeg(640, 480, seed) for seed in range(64)]


def raw_decode(model: ImageModel, draft: bool, seconds: float) -> float:
    """Images/s of decode + open_clip preprocess on one thread."""
    from dataclasses import replace

    saved = model.limits
    model.limits = replace(saved, draft=draft)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.prepare("image", PHOTOS[done % 64:done % 64 + 8], None)
        done += 8
    model.limits = saved
    return done / (time.perf_counter() - t0)


def draft_difference(model: ImageModel) -> dict[str, float]:
    """How far draft-decoded inputs are from fully decoded ones (pixels in [0, 1] units)."""
    from dataclasses import replace

    saved = model.limits
    model.limits = replace(saved, draft=False)
    full = [t.float().numpy() for t in model.prepare("image", PHOTOS[:16], None)]
    model.limits = replace(saved, draft=True)
    drafted = [t.float().numpy() for t in model.prepare("image", PHOTOS[:16], None)]
    model.limits = saved
    std = np.array([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1)
    diffs = [np.abs(a - b) * std for a, b in zip(full, drafted, strict=True)]
    mse = float(np.mean([np.mean(d**2) for d in diffs]))
    return {"mean_abs": float(np.mean([d.mean() for d in diffs])),
            "psnr_db": 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")}


def raw_forward(model: ImageModel, seconds: float) -> float:
    images = model.prepare("image", PHOTOS[:BATCH], None)
    model.forward("image", images)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.forward("image", images)
        done += BATCH
    return done / (time.perf_counter() - t0)


def served_images(endpoint: str, per_request: int, window: int, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    pending: deque[tuple[float, Any]] = deque()
    done = 0
    with Client(endpoint, timeout=60) as c:
        t0 = time.perf_counter()
        sent = 0
        while time.perf_counter() - t0 < seconds or pending:
            while len(pending) < window and time.perf_counter() - t0 < seconds:
                batch = [PHOTOS[(sent * per_request + k) % 64] for k in range(per_request)]
                pending.append((time.perf_counter(), c.submit("image", "image", batch)))
                sent += 1
            start, pnd = pending.popleft()
            c.result(pnd)
            lat.append((time.perf_counter() - start) * 1000)
            done += 1
        elapsed = time.perf_counter() - t0
    return {"images_per_s": done * per_request / elapsed, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99)}


def text_latency(endpoint: str, seconds: float) -> dict[str, Any]:
    lat, errors = [], 0
    with Client(endpoint, timeout=30) as c:
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds:
            s = time.perf_counter()
            try:
                c.embed_texts([f"red running shoes size {i}"])
                lat.append((time.perf_counter() - s) * 1000)
            except ZembedError:
                errors += 1
            i += 1
    return {"requests": len(lat), "errors": errors, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99)}


def flood(endpoint: str, seconds: float) -> None:
    """Saturate the image lane from this process; print what it got as JSON."""
    counts = {"ok": 0, "429": 0, "other": 0}

    async def worker(c: AsyncClient, stop: float, k: int) -> None:
        while time.monotonic() < stop:
            try:
                # Distinct photos per worker: identical ones would be computed once.
                await c.embed_images(PHOTOS[4 * k:4 * k + 4])
                counts["ok"] += 1
            except Overloaded:
                counts["429"] += 1
                await asyncio.sleep(0.001)
            except ZembedError:
                counts["other"] += 1

    async def main() -> None:
        stop = time.monotonic() + seconds
        async with AsyncClient(endpoint, timeout=60) as c:
            await asyncio.gather(*(worker(c, stop, k) for k in range(16)))

    asyncio.run(main())
    print(json.dumps(counts))


def start_stack() -> tuple[list[subprocess.Popen[bytes]], str]:
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    z = [sys.executable, "-m", "zembed", "start"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    # No cache: this measures the engines (repeated photos would otherwise be cache hits).
    procs = [subprocess.Popen([*z, "broker", "--frontend", fe, "--backend", be, "--cache",
                               "off"], **quiet),
             subprocess.Popen([*z, "text", "--broker", be], **quiet),
             subprocess.Popen([*z, "image", "--broker", be, "--random-weights"], **quiet)]
    t0 = time.monotonic()
    with Client(fe, timeout=1) as c:
        while not c.ready(timeout=1).get("ready"):
            if time.monotonic() - t0 > 180:
                raise TimeoutError("stack not ready in 180 s")
            time.sleep(0.1)
    return procs, fe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--flood", nargs=2, metavar=("ENDPOINT", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flood:
        flood(args.flood[0], float(args.flood[1]))
        return
    out: dict[str, Any] = {}
    model = ImageModel(ImageEngineConfig(random_weights=True))
    out["threads"] = model.describe()["threads"]
    out["raw_decode_full"] = raw_decode(model, False, args.seconds / 2)
    out["raw_decode_draft"] = raw_decode(model, True, args.seconds / 2)
    out["draft_difference"] = draft_difference(model)
    out["raw_forward"] = raw_forward(model, args.seconds)
    del model
    procs, fe = start_stack()
    try:
        served_images(fe, 4, 2, 2.0)  # warm
        out["served_4x4"] = served_images(fe, 4, 4, args.seconds)
        out["served_1x16"] = served_images(fe, 1, 16, args.seconds)
        out["text_alone"] = text_latency(fe, args.seconds)
        flooder = subprocess.Popen([sys.executable, __file__, "--flood", fe,
                                    str(args.seconds + 2)], stdout=subprocess.PIPE)
        time.sleep(1.0)
        out["text_under_image_flood"] = text_latency(fe, args.seconds)
        out["flood"] = json.loads(flooder.communicate(timeout=120)[0])
        with Client(fe) as c:
            out["text_lane_429"] = c.stats()["lanes"]["text"]["requests"]["429"]
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(15)
    limit = min(out["raw_forward"], out["raw_decode_draft"])
    if args.json:
        print(json.dumps(out, indent=2))
        return
    d = out["draft_difference"]
    print(f"ViT-B-32 (random weights), {out['threads']} torch thread(s), 640x480 JPEGs")
    print(f"raw decode+preprocess, 1 thread: {out['raw_decode_full']:.0f} img/s full decode, "
          f"{out['raw_decode_draft']:.0f} img/s draft mode "
          f"(x{out['raw_decode_draft'] / out['raw_decode_full']:.2f}); draft changes the model "
          f"input by {d['mean_abs']:.4f} mean abs (PSNR {d['psnr_db']:.1f} dB)")
    print(f"raw forward @{BATCH}: {out['raw_forward']:.1f} img/s")
    for name in ("served_4x4", "served_1x16"):
        r = out[name]
        print(f"served {name[7:]:5} (images x in flight): {r['images_per_s']:.1f} img/s, p50 "
              f"{r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms; ratio to min(raw forward, raw "
              f"decode) {r['images_per_s'] / limit:.2f}")
    for name in ("text_alone", "text_under_image_flood"):
        r = out[name]
        print(f"text 1-item, {name.replace('_', ' ')}: p50 {r['p50_ms']:.2f} ms, p99 "
              f"{r['p99_ms']:.2f} ms, {r['requests']} ok, {r['errors']} errors")
    print(f"image flood: {out['flood']}; text-lane 429s: {out['text_lane_429']}")


if __name__ == "__main__":
    main()

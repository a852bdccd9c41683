"""The all-hit cache path versus the raw ZeroMQ round trip and raw Redis MGET, in one run.

- raw ZeroMQ: a DEALER client (the SDK's own frame encoding and reply decoding) against a
  bare ROUTER echo process that answers every request with a reply of the same size as the
  broker's (header + n x 384 f32). No broker, no Redis: the ceiling of the transport.
- raw Redis: MGET of 1 and 16 keys holding 774-byte values (a framed 384-d BF16 vector).
- served: the same requests through a real broker (Redis cache) whose every item is a hit,
  with 1 and with 64 requests in flight; the ratio is to the raw ZeroMQ rate alike.
- hit ratio: 3000 one-item requests drawn Zipf-like from 600 distinct sentences, from a cold
  cache, as a search service's repeated queries would be.

Usage: ``cd benchmarks && ../.venv/bin/python bench_cache.py [--seconds 5] [--redis URL]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections import deque
from typing import Any

import numpy as np
import zmq

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_text import free_port, pct, sentences

from zembed import protocol as p
from zembed.client import Client
from zembed.client.codec import decode_embed, embed_frames, reply_id
from zembed.messages import reply_header

DIM = 384


def echo_server(endpoint: str) -> None:
    """A bare ROUTER that answers each embed request like the broker would (f32 rows)."""
    import msgpack

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    bodies: dict[int, bytes] = {}
    while True:
        ident, _, raw_header, _ = sock.recv_multipart()
        header = msgpack.unpackb(raw_header)
        n = header["n"]
        body = bodies.setdefault(n, np.zeros((n, DIM), dtype="<f4").tobytes())
        sock.send_multipart([ident, p.CLIENT_PROTO, reply_header(
            header["id"], p.OK, dtype=p.DTYPE_F32, shape=(n, DIM), cached=list(range(n))),
            body])


def closed_loop(sock: zmq.Socket[Any], make: Any, window: int, seconds: float) -> dict[str, Any]:
    """Keep ``window`` requests in flight on a raw DEALER for ``seconds``."""
    lat: list[float] = []
    sent_at: dict[int, float] = {}
    done, rid = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or sent_at:
        while len(sent_at) < window and time.perf_counter() - t0 < seconds:
            rid += 1
            sent_at[rid] = time.perf_counter()
            sock.send_multipart(make(rid))
        frames = sock.recv_multipart()
        got, header = reply_id(frames)
        decode_embed(header, frames[2])
        lat.append((time.perf_counter() - sent_at.pop(got or 0)) * 1000)
        done += 1
    elapsed = time.perf_counter() - t0
    return {"requests_per_s": done / elapsed, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}


def raw_zmq(items: list[str], window: int, seconds: float) -> dict[str, Any]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, __file__, "--echo", endpoint])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        time.sleep(0.5)

        def make(rid: int) -> list[bytes]:
            return embed_frames(rid, "text", "text", items, normalize=True, dtype="f32",
                                timeout_s=10, input_type=None)

        closed_loop(sock, make, 1, 0.5)
        return closed_loop(sock, make, window, seconds)
    finally:
        sock.close(linger=0)
        server.kill()
        server.wait()


def raw_redis(url: str, keys_per_call: int, seconds: float) -> dict[str, Any]:
    import redis

    r = redis.Redis.from_url(url)
    prefix = f"bench:{uuid.uuid4().hex}:"
    keys = [f"{prefix}{i}".encode() for i in range(256)]
    r.mset({k: b"\x00" * 774 for k in keys})
    calls, lat = 0, []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = keys[(calls * keys_per_call) % 240:][:keys_per_call]
        s = time.perf_counter()
        r.mget(batch)
        lat.append((time.perf_counter() - s) * 1000)
        calls += 1
    elapsed = time.perf_counter() - t0
    r.delete(*keys)
    return {"calls_per_s": calls / elapsed, "keys_per_s": calls * keys_per_call / elapsed,
            "p50_ms": pct(lat, 50)}


def served(client: Client, items: list[str], window: int, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    pending: deque[tuple[float, Any]] = deque()
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or pending:
        while len(pending) < window and time.perf_counter() - t0 < seconds:
            pending.append((time.perf_counter(), client.submit("text", "text", items)))
        start, handle = pending.popleft()
        result = client.result(handle)
        assert result.cached == len(items), "the all-hit benchmark must only hit"
        lat.append((time.perf_counter() - start) * 1000)
        done += 1
    elapsed = time.perf_counter() - t0
    return {"requests_per_s": done / elapsed, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}


def hit_ratio(client: Client, requests: int = 3000, distinct: int = 600) -> float:
    rng = np.random.default_rng(3)
    pool = [f"{s} {uuid.uuid4().hex[:6]}" for s in sentences(distinct, seed=11)]
    ranks = np.minimum(rng.zipf(1.3, requests), distinct) - 1
    before = client.stats()["lanes"]["text"]
    pending: deque[Any] = deque()
    for r in ranks:
        if len(pending) >= 8:
            client.result(pending.popleft())
        pending.append(client.submit("text", "text", [pool[int(r)]]))
    while pending:
        client.result(pending.popleft())
    after = client.stats()["lanes"]["text"]
    hits = after["cache_hits"]["text"] - before["cache_hits"].get("text", 0)
    misses = after["cache_misses"]["text"] - before["cache_misses"].get("text", 0)
    return float(hits / (hits + misses))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--echo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo:
        echo_server(args.echo)
        return
    shapes = {1: sentences(1, seed=5), 16: sentences(16, seed=6)}
    print("raw redis MGET: " + ", ".join(
        f"{k} key(s) {r['calls_per_s']:.0f} calls/s = {r['keys_per_s']:.0f} keys/s "
        f"(p50 {r['p50_ms']:.3f} ms)"
        for k, r in ((k, raw_redis(args.redis, k, args.seconds / 2)) for k in (1, 16))))
    raw = {(n, w): raw_zmq(items, w, args.seconds) for n, items in shapes.items()
           for w in (1, 64)}
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    z = [sys.executable, "-m", "zembed", "start"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen([*z, "broker", "--frontend", fe, "--backend", be, "--lanes",
                               "text", "--cache", args.redis, "--cache-prefix", prefix], **quiet),
             subprocess.Popen([*z, "text", "--broker", be], **quiet)]
    try:
        with Client(fe, timeout=30) as c:
            while not c.ready(timeout=1).get("ready"):
                time.sleep(0.1)
            for items in shapes.values():  # fill the cache, then wait for the write-back
                while c.embed("text", "text", items).cached < len(items):
                    time.sleep(0.05)
            print(f"\n{'all-hit requests':26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'raw zmq req/s':>14} {'ratio':>6}")
            for (n, w), r in raw.items():
                s = served(c, shapes[n], w, args.seconds)
                print(f"{n:2} item(s), {w:2} in flight     {s['requests_per_s']:8.0f} "
                      f"{s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {r['requests_per_s']:14.0f} "
                      f"{s['requests_per_s'] / r['requests_per_s']:6.2f}")
            ratio = hit_ratio(c)
            print(f"\nhit ratio, 3000 one-item requests Zipf(1.3) over 600 sentences, cold "
                  f"start: {ratio:.3f}")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
        import redis

        r = redis.Redis.from_url(args.redis)
        for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            r.unlink(key)


if __name__ == "__main__":
    main()

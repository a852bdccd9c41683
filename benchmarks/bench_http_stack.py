"""Which HTTP stack for the gateway (issue 14): uvicorn (uvloop + httptools) or granian.

Measures each server's own cost, without a broker behind it: an ASGI app answers
``POST /v1/embeddings`` with an OpenAI-shaped body of N 384-float vectors serialised by orjson
(the gateway's reply work), and ``GET /health``. Beside them, the raw limit of the same run: a
bare asyncio server that sends the same bytes without parsing anything (socket + event loop
only). One closed-loop client (keep-alive connections, bounded in time) drives every server in
turn, so the ratios served/raw are comparable within the run. Usage::

    pip install "uvicorn[standard]" granian orjson     # not zembed extras yet
    .venv/bin/python benchmarks/bench_http_stack.py [--seconds 5] [--connections 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np

DIM = 384


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def payload(n: int) -> bytes:
    """An OpenAI embeddings response of ``n`` vectors, as the gateway would serialise it."""
    import orjson

    vectors = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    return orjson.dumps({
        "object": "list", "model": "all-MiniLM-L6-v2",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }, option=orjson.OPT_SERIALIZE_NUMPY)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app under test: parse the request body, serialise a reply of that size."""
    if scope["type"] != "http":
        return
    import orjson

    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/health":
        out = b'{"ok":true}'
    else:
        request = orjson.loads(body)
        items = request["input"] if isinstance(request["input"], list) else [request["input"]]
        vectors = np.ones((len(items), DIM), dtype=np.float32) * 0.5
        out = orjson.dumps({
            "object": "list", "model": request.get("model", ""),
            "data": [{"object": "embedding", "index": i, "embedding": v}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0}}, option=orjson.OPT_SERIALIZE_NUMPY)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def raw_server(port: int) -> None:
    """The floor: read a request (headers + Content-Length body), write canned bytes."""
    canned = {n: payload(n) for n in (1, 32)}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length) if length else b""
            out = canned[32] if body.count(b'"x') >= 32 else canned[1]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(out)).encode() + b"\r\n\r\n" + out)
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    import uvloop

    uvloop.run(main())


def start(kind: str, port: int) -> subprocess.Popen[bytes]:
    here = os.path.dirname(os.path.abspath(__file__))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": here}
    if kind == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "bench_http_stack:app", "--host", "127.0.0.1",
               "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
               "--log-level", "warning"]
    elif kind == "granian":
        cmd = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--loop", "uvloop", "--no-ws",
               "--log-level", "warning", "bench_http_stack:app"]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--serve-raw", str(port)]
    proc = subprocess.Popen(cmd, **quiet)  # type: ignore[call-overload]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"{kind} did not listen within 30 s")


def request(items: int) -> bytes:
    body = (b'{"model":"all-MiniLM-L6-v2","input":['
            + b",".join(b'"x%d red running shoes"' % i for i in range(items)) + b"]}")
    return (b"POST /v1/embeddings HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json"
            b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def load(port: int, items: int, connections: int, seconds: float) -> dict[str, float]:
    """Closed loop over keep-alive connections; every read bounded by a timeout."""
    raw = request(items)
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def one() -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(raw)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await asyncio.wait_for(reader.readexactly(length), 5)
            lat.append(time.perf_counter() - t0)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"requests_per_s": len(lat) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--serve-raw", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_raw:
        raw_server(args.serve_raw)
        return
    print(f"machine: {os.cpu_count()} cores; {args.connections} keep-alive connections, "
          f"{args.seconds:.0f} s per case; client and server share the cores")
    results: dict[tuple[str, int], dict[str, float]] = {}
    for kind in ("raw", "uvicorn", "granian"):
        port = free_port()
        proc = start(kind, port)
        try:
            for items in (1, 32):
                asyncio.run(load(port, items, args.connections, 1.0))  # warm up
                results[kind, items] = asyncio.run(
                    load(port, items, args.connections, args.seconds))
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"\n{'server':10} {'vectors':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'/raw':>6}")
    for (kind, items), r in results.items():
        ratio = r["requests_per_s"] / results["raw", items]["requests_per_s"]
        print(f"{kind:10} {items:7d} {r['requests_per_s']:9.0f} {r['p50_ms']:8.2f} "
              f"{r['p99_ms']:8.2f} {ratio:6.2f}")


if __name__ == "__main__":
    main()

"""``zembed bench --raw``: the raw limits of this machine, measured in the same run.

- model forward throughput in-process, at the request's batch size and at the engine's
  max batch (the engine's own model code and config: same model, dtype, threads);
- image decode + preprocess throughput on one thread;
- a bare ZeroMQ DEALER -> ROUTER echo round trip with the same request and reply sizes.

Served figures are printed beside these as ratios, because absolute numbers on shared machines
swing from run to run while ratios measured together do not.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import msgpack
import numpy as np
import zmq

from zembed import config as cfgmod
from zembed import protocol as p
from zembed.messages import reply_header
from zembed.tools.inputs import InputSource
from zembed.tools.net import loopback_endpoint


def _rate(fn: Any, per_call: int, seconds: float) -> float:
    fn()  # warm
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        done += per_call
    return done / (time.perf_counter() - t0)


def model_forward(kind: str, batches: list[int], seconds: float,
                  config_file: str | None) -> dict[str, float]:
    """Items/s of the engine's model at each batch size (text, or image/clip-text)."""
    if kind == p.KIND_TEXT:
        from zembed.engines.text import TextModel

        model: Any = TextModel(cfgmod.load(cfgmod.TextEngineConfig, config_file=config_file))
    else:
        from zembed.engines.image import ImageModel

        model = ImageModel(cfgmod.load(cfgmod.ImageEngineConfig, config_file=config_file))
    source = InputSource(kind, seed=99)
    out = {}
    for batch in batches:
        items = source.take(batch)
        if kind == p.KIND_IMAGE:  # decoding is measured on its own below
            inputs = model.prepare(kind, items, None)
            call = lambda inputs=inputs: model.forward(kind, inputs)  # noqa: E731
        else:  # text: tokenising is part of the model's work, as in the engine
            call = lambda items=items: model.forward(kind, model.prepare(kind, items, None))  # noqa: E731
        out[f"forward_items_per_s@{batch}"] = _rate(call, batch, seconds)
    if kind == p.KIND_IMAGE:
        photos = source.take(16)
        out["decode_preprocess_per_s"] = _rate(lambda: model.prepare(kind, photos, None), 16,
                                               seconds)
    return out


def _echo(endpoint: str, dim: int) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    bodies: dict[int, bytes] = {}
    while True:
        ident, _, raw, _ = sock.recv_multipart()
        h = msgpack.unpackb(raw)
        body = bodies.setdefault(h["n"], bytes(2 * dim * h["n"]))  # BF16, as bench asks
        sock.send_multipart([ident, p.CLIENT_PROTO, reply_header(
            h["id"], p.OK, dtype=p.DTYPE_BF16, shape=(h["n"], dim)), body])


def zmq_round_trip(kind: str, items: int, in_flight: int, seconds: float,
                   dim: int = 384) -> dict[str, float]:
    """Round trips/s and p50 of the same frames, same load generator, against a bare echo.

    The echo process answers every request at once with a reply of the real size and does
    nothing else, so served/raw is what the broker (cache, admission, engines) costs on top of
    ZeroMQ and the client loop.
    """
    from zembed.tools.bench import Bench, BenchSpec

    endpoint = loopback_endpoint()
    proc = multiprocessing.get_context("spawn").Process(target=_echo, args=(endpoint, dim),
                                                        daemon=True)
    proc.start()
    try:
        spec = BenchSpec(kinds=(kind,), items=items, concurrency=in_flight, window=1,
                         duration_s=seconds, timeout_s=10.0)
        report = Bench(endpoint, spec, progress=False).run()
        if not report.ok:
            raise TimeoutError("echo process did not answer")
        lat = np.array(report.latencies_ms)
        return {"round_trips_per_s": report.ok / report.elapsed_s,
                "p50_ms": float(np.percentile(lat[len(lat) // 10:], 50))}
    finally:
        proc.kill()
        proc.join(5)

"""``zembed bench --raw``: the raw limits of this machine, measured in the same run.

- model forward throughput in-process, at the request's batch size and at the engine's
  max batch, with the engine's own model code, of the model the serving engine announced in
  READY (architecture, weights, dtype; see :func:`engine_config`), the config file filling in
  what an announcement does not carry (a checkpoint's path, a model config file, threads);
- image decode + preprocess throughput on one thread;
- a bare ZeroMQ DEALER -> ROUTER echo round trip with the same request and reply sizes.

Served figures are printed beside these as ratios, because absolute numbers on shared machines
swing from run to run while ratios measured together do not.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import click
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


#: The name a text engine announces for its default model, which ships inside a package.
BUNDLED_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class RawUnavailable(click.ClickException):
    """``--raw`` cannot load the model the engines serve; the message says what to pass.

    A ClickException, so ``zembed bench`` stops with that one line instead of a traceback.
    """


def engine_config(kind: str, config_file: str | None, served: dict[str, Any] | None) -> Any:
    """The engine config to measure: the config file's, made to match the serving engine.

    ``served`` is one engine of the lane as the broker's stats show it (what it announced in
    READY). Its architecture (``model``), weights (``random_weights``, ``pretrained``) and
    ``dtype`` win over the file: the raw figures are meant to describe the model being served,
    and an engine started with ``--random-weights`` must not send the raw step off to load (or
    download) weights that nobody serves. A checkpoint is announced by file name only, so its
    path comes from the config file's ``pretrained`` when the names match. The device is the
    engine's where this machine has it.
    """
    if kind == p.KIND_TEXT:
        cfg: Any = cfgmod.load(cfgmod.TextEngineConfig, config_file=config_file)
    else:
        cfg = cfgmod.load(cfgmod.ImageEngineConfig, config_file=config_file)
    if not served:
        return cfg
    changes: dict[str, Any] = {}
    model = served.get("model")
    if isinstance(model, str) and not (kind == p.KIND_TEXT and not cfg.model
                                       and model == BUNDLED_TEXT_MODEL):
        changes["model"] = model  # (the bundled default is announced by its hub name)
    if isinstance(served.get("dtype"), str):
        changes["dtype"] = served["dtype"]
    device = served.get("device")
    if isinstance(device, str) and (device == "cpu" or _has_cuda(device)):
        changes["device"] = device
    if kind == p.KIND_TEXT and isinstance(served.get("batch_invariant"), bool):
        changes["batch_invariant"] = served["batch_invariant"]
    if kind != p.KIND_TEXT:
        random_weights = bool(served.get("random_weights"))
        changes["random_weights"] = random_weights
        weights = served.get("pretrained")
        if not random_weights and isinstance(weights, str) and weights:
            mine = cfg.pretrained
            same_file = os.path.isfile(mine) and Path(mine).name == weights
            changes["pretrained"] = mine if same_file else weights
    return dataclasses.replace(cfg, **changes)


def _has_cuda(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def load_model(kind: str, config_file: str | None, served: dict[str, Any] | None) -> Any:
    """The engine's model class on :func:`engine_config`, or :class:`RawUnavailable`."""
    cfg = engine_config(kind, config_file, served)
    what = cfg.model
    if kind != p.KIND_TEXT:
        what += " with " + ("random weights" if cfg.random_weights else repr(cfg.pretrained))
    what += f", {cfg.dtype}"
    try:
        if kind == p.KIND_TEXT:
            from zembed.engines.text import TextModel

            return TextModel(cfg)
        from zembed.engines.image import ImageModel

        return ImageModel(cfg)
    except Exception as exc:  # WeightsUnavailable, a missing model config, a hub error, ...
        source = ("as the serving engine announced it" if served else
                  "from the config (no engine of this lane was reachable to ask)")
        hint = ("pass --config with the engine's own config file (its model_config and the "
                "path of its checkpoint file), or bench without --raw")
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise RawUnavailable(f"--raw could not load the {kind} model {what} {source}: "
                             f"{reason}. To measure it, {hint}") from None


def model_forward(kind: str, batches: list[int], seconds: float, config_file: str | None,
                  served: dict[str, Any] | None = None) -> dict[str, Any]:
    """Items/s of the served model at each batch size (text, or image/clip-text).

    ``served``: the serving engine's stats entry (:func:`engine_config`). When the model
    loaded here has another fingerprint than the served one, ``model_mismatch`` says so:
    the ratios then compare different models.
    """
    model = load_model(kind, config_file, served)
    source = InputSource(kind, seed=99)
    out: dict[str, Any] = {}
    # The stats show one fingerprint per engine (its first kind's); each kind has its own.
    mine = {model.fingerprint(k) for k in model.kinds}
    theirs = served.get("fingerprint") if served else None
    if theirs and theirs not in mine:
        out["model_mismatch"] = (f"raw model {model.fingerprint(kind)} is not the served "
                                 f"{theirs} (other weights, dtype or config): ratios compare "
                                 "two models")
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

"""Start engine processes from their configs: load, warm up and size, then serve (READY after
warm-up)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from zembed.config import ImageEngineConfig, TextEngineConfig
from zembed.engines.runtime import RuntimeSettings, serve
from zembed.engines.sizing import Plan, Sizing
from zembed.security import client_keys

log = logging.getLogger("zembed.engine")

#: The floor of automatic credits by engine kind: two typical client requests (32 texts, or
#: 8 images) must fit, whatever the machine measured (engines/sizing.py).
MIN_CREDITS = {"text": 64, "image": 16}


def _settings(cfg: TextEngineConfig | ImageEngineConfig) -> RuntimeSettings:
    client_keys(cfg.curve_secret_key, cfg.curve_server_key)  # bad key files fail before loading
    return RuntimeSettings(
        broker=cfg.broker, credits=cfg.credits, max_batch=cfg.max_batch,
        max_tokens=getattr(cfg, "max_batch_tokens", 0),
        max_wait_ms=cfg.max_wait_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        heartbeat_liveness=cfg.heartbeat_liveness, stall_timeout_s=cfg.stall_timeout_s,
        curve_secret_key=cfg.curve_secret_key, curve_server_key=cfg.curve_server_key,
        batch_delay_file=cfg.batch_delay_file)


def _plan(cfg: TextEngineConfig | ImageEngineConfig) -> Plan:
    """What warm-up sizes: the options left at 0 (``credits``, ``max_batch``, ``threads``)."""
    for name in ("credits", "max_batch", "threads"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 (sized at warm-up) or more")
    if cfg.latency_target_ms <= 0:
        raise ValueError("--latency-target-ms must be more than 0")
    return Plan(max_batch=cfg.max_batch, credits=cfg.credits, threads=cfg.threads,
                latency_target_ms=cfg.latency_target_ms,
                min_credits=MIN_CREDITS[type(cfg).section])


def _sized(kind: str, facts: dict[str, Any], dim: int, t0: float, sizing: Sizing,
           settings: RuntimeSettings) -> RuntimeSettings:
    """Log the load and the sizing; the runtime settings with the chosen credits and batch."""
    log.info("%s model %s (%s, %s, dim %d) loaded and warm in %.1fs: %.0f items/s at batch %d",
             kind, facts["model"], facts["device"], facts["dtype"], dim,
             time.perf_counter() - t0, sizing.chosen.items_per_s, sizing.max_batch)
    log.info("%s", sizing.describe())
    return replace(settings, credits=sizing.credits, max_batch=sizing.max_batch,
                   max_tokens=sizing.max_batch_tokens)


def serve_text(cfg: TextEngineConfig) -> None:
    """Load the text model, warm it up and size it, and serve it until SIGINT/SIGTERM."""
    from zembed.engines.text import TextModel

    settings = _settings(cfg)
    plan = _plan(cfg)
    t0 = time.perf_counter()
    model = TextModel(cfg)
    sizing, warm = model.warmup(plan)
    settings = _sized("text", model.describe(), model.dim, t0, sizing, settings)
    serve(model, settings, ready_extra=warm)


def serve_image(cfg: ImageEngineConfig) -> None:
    """Load the open_clip model, warm it up and size it, and serve it until SIGINT/SIGTERM.

    Raises :class:`~zembed.engines.image.WeightsUnavailable` when no weights can be had.
    """
    from zembed.engines.image import ImageModel

    settings = _settings(cfg)
    plan = _plan(cfg)
    t0 = time.perf_counter()
    model = ImageModel(cfg)
    sizing, warm = model.warmup(plan)
    settings = _sized("image", model.describe(), model.dim, t0, sizing, settings)
    serve(model, settings, ready_extra=warm)

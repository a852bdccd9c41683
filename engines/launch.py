"""Start engine processes from their configs: load, warm up, then serve (READY after warm-up)."""

from __future__ import annotations

import logging
import time
from typing import Any

from zembed.config import ImageEngineConfig, TextEngineConfig
from zembed.engines.runtime import RuntimeSettings, serve
from zembed.security import client_keys

log = logging.getLogger("zembed.engine")


def _settings(cfg: TextEngineConfig | ImageEngineConfig) -> RuntimeSettings:
    client_keys(cfg.curve_secret_key, cfg.curve_server_key)  # bad key files fail before loading
    return RuntimeSettings(
        broker=cfg.broker, credits=cfg.credits, max_batch=cfg.max_batch,
        max_tokens=getattr(cfg, "max_batch_tokens", 0),
        max_wait_ms=cfg.max_wait_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        heartbeat_liveness=cfg.heartbeat_liveness, stall_timeout_s=cfg.stall_timeout_s,
        curve_secret_key=cfg.curve_secret_key, curve_server_key=cfg.curve_server_key)


def _loaded(kind: str, facts: dict[str, Any], dim: int, t0: float, warm: dict[str, Any],
            batch: int) -> None:
    log.info("%s model %s (%s, %s, dim %d) loaded and warm in %.1fs: %.0f items/s at batch %d",
             kind, facts["model"], facts["device"], facts["dtype"], dim,
             time.perf_counter() - t0, warm["warmup_items_per_s"], batch)


def serve_text(cfg: TextEngineConfig) -> None:
    """Load the text model, warm it up, and serve it until SIGINT/SIGTERM."""
    from zembed.engines.text import TextModel

    settings = _settings(cfg)
    t0 = time.perf_counter()
    model = TextModel(cfg)
    warm = model.warmup(cfg.max_batch)
    _loaded("text", model.describe(), model.dim, t0, warm, cfg.max_batch)
    serve(model, settings, ready_extra=warm)


def serve_image(cfg: ImageEngineConfig) -> None:
    """Load the open_clip model, warm it up, and serve it until SIGINT/SIGTERM.

    Raises :class:`~zembed.engines.image.WeightsUnavailable` when no weights can be had.
    """
    from zembed.engines.image import ImageModel

    settings = _settings(cfg)
    t0 = time.perf_counter()
    model = ImageModel(cfg)
    warm = model.warmup(cfg.max_batch)
    _loaded("image", model.describe(), model.dim, t0, warm, cfg.max_batch)
    serve(model, settings, ready_extra=warm)

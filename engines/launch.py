"""Start engine processes from their configs: load, warm up, then serve (READY after warm-up)."""

from __future__ import annotations

import logging
import time

from zembed.config import TextEngineConfig
from zembed.engines.runtime import RuntimeSettings, serve

log = logging.getLogger("zembed.engine")


def serve_text(cfg: TextEngineConfig) -> None:
    """Load the text model, warm it up, and serve it until SIGINT/SIGTERM."""
    from zembed.engines.text import TextModel

    t0 = time.perf_counter()
    model = TextModel(cfg)
    warm = model.warmup(cfg.max_batch)
    log.info("text model %s (%s, %s, dim %d) loaded and warm in %.1fs: %.0f items/s at batch %d",
             model.name, model.device, model.describe()["dtype"], model.dim,
             time.perf_counter() - t0, warm["warmup_items_per_s"], cfg.max_batch)
    settings = RuntimeSettings(
        broker=cfg.broker, credits=cfg.credits, max_batch=cfg.max_batch,
        max_wait_ms=cfg.max_wait_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        heartbeat_liveness=cfg.heartbeat_liveness, stall_timeout_s=cfg.stall_timeout_s)
    serve(model, settings, ready_extra=warm)

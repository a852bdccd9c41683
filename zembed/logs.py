"""Logging set-up shared by the processes: one line per event, process name first."""

from __future__ import annotations

import logging
import os


def setup(level: str, process: str) -> None:
    """Configure root logging for ``process`` (broker, text, ...) at ``level``."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {process}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    # transformers' load progress bars and advisory warnings would drown the engine's own lines.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

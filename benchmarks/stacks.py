"""A broker (cache off, text lane) and one text engine on private ports, for benchmark scripts.

Run from a benchmark as ``from stacks import text_stack`` (the scripts' folder is on the path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from zembed.tools.net import free_port


@contextmanager
def text_stack(text_config: str = "") -> Iterator[tuple[str, str]]:
    """Yield (frontend endpoint, config file) once ``zembed ready`` says yes.

    ``text_config``: extra TOML lines for the ``[text]`` section (model, batch_invariant, ...).
    """
    fe, be, st = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(f'[broker]\nfrontend = "{fe}"\nbackend = "{be}"\nlanes = ["text"]\n'
                 f'cache = "off"\nstats_endpoint = "{st}"\n'
                 f'[text]\nbroker = "{be}"\n{text_config}'
                 f'[client]\nendpoint = "{fe}"\nstats_endpoint = "{st}"\n')
    z = [sys.executable, "-m", "zembed", "start"]
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([*z, "broker", "--config", fh.name], **quiet),
             subprocess.Popen([*z, "text", "--config", fh.name], **quiet)]
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([sys.executable, "-m", "zembed", "ready", "--config", fh.name],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("broker + text engine not ready in 180 s")
            time.sleep(0.5)
        yield fe, fh.name
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(15)
        os.unlink(fh.name)

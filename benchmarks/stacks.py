"""Stacks for benchmark scripts: processes on private ports, started, awaited and stopped.

``text_stack``: a broker (cache off, text lane) and one text engine, as a context manager.
``Children``: named ``zembed`` processes with a log each, for scripts that restart a broker
with other flags or add a gateway. ``machine()`` names the CPU for the figures.

Run from a benchmark as ``from stacks import text_stack`` (the scripts' folder is on the path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zembed.client import Client
from zembed.errors import ZembedError
from zembed.tools.net import free_port


def machine() -> str:
    """``lscpu``'s model name and the cores this process may use."""
    name = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                     if ln.startswith("Model name:")), name)
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


class Children:
    """Named ``python -m zembed ...`` processes, each logging to ``logs/NAME.log``."""

    def __init__(self, prefix: str) -> None:
        self.logs = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, *args: str, cpus: set[int] | None = None) -> None:
        """Start ``zembed ARGS`` as ``name`` (on ``cpus`` only, when given)."""
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "zembed", *args], stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=None if cpus is None else (lambda: os.sched_setaffinity(0, cpus)))

    def stop(self, name: str) -> None:
        """SIGTERM ``name``; SIGKILL it if it is still there 10 s later."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        """Stop every process, the last started first and the broker last (so engines and
        gateways leave a live broker)."""
        for name in [n for n in reversed(list(self.procs)) if n != "broker"] + ["broker"]:
            self.stop(name)

    def wait_ready(self, frontend: str, timeout_s: float = 180.0,
                   also: Callable[[], bool] = lambda: True) -> float:
        """Seconds until the broker at ``frontend`` says ready and ``also()`` holds; fails when
        a child exits or after ``timeout_s``."""
        t0 = time.monotonic()
        with Client(frontend, timeout=1.0, retries=0) as client:
            while True:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}; log: "
                                           f"{self.logs / (name + '.log')}")
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"not ready within {timeout_s:.0f} s; logs: {self.logs}")
                try:
                    ready = bool(client.ready(timeout=1.0).get("ready"))
                except ZembedError:
                    ready = False
                if ready and also():
                    return time.monotonic() - t0
                time.sleep(0.2)


class TextLane(Children):
    """A broker of the text lane alone (cache off, so every input reaches an engine) on free
    loopback ports, for benchmarks that restart it and its engine with other settings."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.fe, self.be, self.st = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))

    def start_broker(self, *args: str, target_ms: float | None = None) -> None:
        """Spawn the broker with ``args`` (and ``--latency-target-ms text=…`` when given)."""
        extra = ["--latency-target-ms", f"text={target_ms:g}"] if target_ms else []
        self.spawn("broker", "start", "broker", "--frontend", self.fe, "--backend", self.be,
                   "--stats-endpoint", self.st, "--lanes", "text", "--cache", "off", *args,
                   *extra)


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

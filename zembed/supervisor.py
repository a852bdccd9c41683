"""``zembed up``: broker and engines as child processes, supervised, shut down together.

Children are ordinary ``zembed start ...`` processes, so what runs under ``up`` is exactly what
runs in production under any other supervisor. A child that dies is restarted with backoff; on
Ctrl-C or SIGTERM every child gets SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import click

from zembed import config as cfgmod
from zembed import logs
from zembed.client import Client
from zembed.errors import ZembedError

log = logging.getLogger("zembed.up")

GRACE_S = 10.0


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started: list[float] = field(default_factory=list)

    def start(self) -> None:
        """Spawn (or respawn) the process."""
        self.proc = subprocess.Popen(self.argv)
        self.started.append(time.monotonic())
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def exited(self) -> int | None:
        """Exit code if the process has ended, else None."""
        return None if self.proc is None else self.proc.poll()


class Supervisor:
    """Start, watch and stop the children of ``zembed up``."""

    def __init__(self, children: list[Child], endpoint: str) -> None:
        self.children = children
        self.endpoint = endpoint
        self._stopping = False

    def start(self) -> None:
        """Start every child, broker first."""
        for child in self.children:
            child.start()

    def wait_ready(self, timeout_s: float) -> float | None:
        """Seconds until the broker says ready; None if asked to stop meanwhile.

        Raises TimeoutError after ``timeout_s``, RuntimeError if a child dies first.
        """
        t0 = time.monotonic()
        with Client(self.endpoint, timeout=1.0) as client:
            while time.monotonic() - t0 < timeout_s and not self._stopping:
                for child in self.children:
                    code = child.exited()
                    if code is not None:
                        raise RuntimeError(f"{child.name} exited with code {code} during start")
                try:
                    if client.ready(timeout=0.5).get("ready"):
                        return time.monotonic() - t0
                except ZembedError:
                    pass
                time.sleep(0.1)
        if self._stopping:
            return None
        raise TimeoutError(f"not ready within {timeout_s:.0f}s")

    def watch(self) -> None:
        """Restart children that die (exponential backoff) until asked to stop."""
        while not self._stopping:
            now = time.monotonic()
            for child in self.children:
                code = child.exited()
                if code is None:
                    continue
                if child.next_start == 0.0:
                    delay = min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                    log.warning("%s exited with code %s; restarting in %.1fs", child.name, code,
                                delay)
                    child.next_start = now + delay
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()
            time.sleep(0.2)

    def request_stop(self, *_: object) -> None:
        """Signal handler: leave :meth:`watch` / :meth:`wait_ready`."""
        self._stopping = True

    def stop(self) -> None:
        """SIGTERM the engines, then the broker (so engines leave a live broker cleanly);
        SIGKILL whatever outlives the grace period."""
        deadline = time.monotonic() + GRACE_S
        engines, broker = self.children[1:], self.children[:1]
        for group in (engines, broker):
            for child in group:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            self._reap(group, deadline)

    def _reap(self, children: list[Child], deadline: float) -> None:
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, GRACE_S)
                child.proc.kill()
                child.proc.wait()


def child_argv(process: str, config_file: str | None) -> list[str]:
    """Command line of a ``zembed start <process>`` child with the same config file."""
    argv = [sys.executable, "-m", "zembed", "start", process]
    return argv + (["--config", config_file] if config_file else [])


def gateway_argv(config_file: str | None, broker: str) -> list[str]:
    """Command line of the ``zembed gateway`` child: the config's [gateway], this broker."""
    argv = [sys.executable, "-m", "zembed", "gateway", "--broker", broker]
    return argv + (["--config", config_file] if config_file else [])


def run_up(config_file: str | None, *, demo: bool, ready_timeout_s: float,
           gateway: bool = False) -> int:
    """``zembed up``: broker plus one engine per configured lane (and the HTTP gateway when
    asked); returns the exit code."""
    logs.setup("info", "up")
    broker_cfg = cfgmod.load(cfgmod.BrokerConfig, config_file=config_file)
    client_cfg = cfgmod.load(cfgmod.ClientConfig, config_file=config_file)
    children = [Child("broker", child_argv("broker", config_file))]
    children += [Child(lane, child_argv(lane, config_file)) for lane in broker_cfg.lanes]
    gateway_url = ""
    if gateway:
        gateway_cfg = cfgmod.load(cfgmod.GatewayConfig, config_file=config_file)
        children.append(Child("gateway", gateway_argv(config_file, client_cfg.endpoint)))
        scheme = "https" if gateway_cfg.tls_certfile else "http"
        gateway_url = f"{scheme}://{gateway_cfg.listen}"
    sup = Supervisor(children, client_cfg.endpoint)
    signal.signal(signal.SIGINT, sup.request_stop)
    signal.signal(signal.SIGTERM, sup.request_stop)
    try:
        sup.start()
        seconds = sup.wait_ready(ready_timeout_s)
        if seconds is None:  # Ctrl-C before ready: a normal, clean stop
            return 0
        click.echo(f"zembed is ready in {seconds:.2f}s (frontend {client_cfg.endpoint}, "
                   f"lanes {','.join(broker_cfg.lanes)}"
                   + (f", HTTP gateway {gateway_url}" if gateway_url else "") + ")")
        if demo:
            from zembed import demo as demo_mod

            demo_mod.run(client_cfg.endpoint, gateway_url)
        else:
            sup.watch()
        return 0
    except (TimeoutError, RuntimeError) as exc:
        click.echo(f"zembed up failed: {exc}", err=True)
        return 1
    finally:
        sup.stop()

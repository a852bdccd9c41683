"""``zembed soak``: mixed load for minutes while engines and Redis are killed, every answer counted.

The promise under test is the broker's: every request gets exactly one answer, whatever fails
behind it. The soak starts its own stack on private loopback ports (a redis-server it may kill,
a broker with the Redis cache, a text engine and an image engine), drives an open loop of text,
image and clip-text requests with a share of repeats (cache hits) through the same wire-level
generator as ``zembed bench``, and meanwhile injects faults on a schedule:

- SIGKILL of the text engine, then of the image engine, each restarted a moment later (the
  broker is never touched: the new engine registers by itself);
- SIGKILL of redis-server, restarted a moment later (the broker serves from the models while
  the cache is down, and reconnects by itself).

At the end it reports sent, answered, no answer (lost), answered twice, answers by status, and
the faults injected, and exits non-zero unless sent = answered with no duplicates.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zembed import protocol as p
from zembed.client import Client
from zembed.tools.bench import Bench, BenchSpec
from zembed.tools.net import free_port, loopback_endpoint


@dataclass
class SoakSpec:
    """What the soak runs.

    :param seconds: how long load is sent.
    :param rate: requests per second, all kinds together (open loop).
    :param image_args: ``zembed start image`` arguments ('' = no image lane).
    :param fault_every_s: seconds between faults; they cycle text kill, image kill, Redis kill.
    :param down_s: how long a killed process stays down before it is restarted.
    :param heartbeat_ms: heartbeat interval of broker and engines.
    :param timeout_s: request deadline; the client waits this plus a margin before it counts a
        request as lost.
    """

    seconds: float = 600.0
    rate: float = 40.0
    image_args: str = "--random-weights"
    fault_every_s: float = 20.0
    down_s: float = 2.0
    heartbeat_ms: int = 500
    timeout_s: float = 10.0
    repeat: float = 0.5
    workdir: str = ""


class _Child:
    """One process of the stack, restartable with the same command line."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                          env=dict(os.environ, HF_HUB_OFFLINE="1"))

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Soak:
    """Owns the stack, the load and the fault schedule of one soak run."""

    def __init__(self, spec: SoakSpec, progress: bool = True) -> None:
        self.spec = spec
        self.progress = progress
        self.dir = Path(spec.workdir or tempfile.mkdtemp(prefix="zembed-soak-"))
        self.frontend = loopback_endpoint()
        backend = loopback_endpoint()
        redis_port = free_port()
        z = [sys.executable, "-m", "zembed", "start"]
        hb = ["--heartbeat-interval-ms", str(spec.heartbeat_ms)]
        self.redis = _Child("redis", [
            shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
            "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            self.dir / "redis.log")
        lanes = "text,image" if spec.image_args else "text"
        self.children = {
            "broker": _Child("broker", [
                *z, "broker", "--frontend", self.frontend, "--backend", backend, "--lanes",
                lanes, "--cache", f"redis://127.0.0.1:{redis_port}/0", "--stats-endpoint", "",
                "--cache-prefix", f"soak{redis_port}", *hb], self.dir / "broker.log"),
            "text": _Child("text", [*z, "text", "--broker", backend, *hb],
                           self.dir / "text.log"),
        }
        if spec.image_args:
            self.children["image"] = _Child("image", [
                *z, "image", "--broker", backend, *hb, *shlex.split(spec.image_args)],
                self.dir / "image.log")
        self._stop = threading.Event()
        self.faults: list[tuple[float, str]] = []  # (seconds into the soak, what)

    def run(self) -> dict[str, Any]:
        """Start everything, soak, stop everything; the report."""
        self.redis.start()
        for child in self.children.values():
            child.start()
        try:
            self._wait_ready(180.0)
            faults = threading.Thread(target=self._faults, name="zembed-soak-faults",
                                      daemon=True)
            kinds = ((p.KIND_TEXT, p.KIND_IMAGE, p.KIND_CLIP_TEXT) if self.spec.image_args
                     else (p.KIND_TEXT,))
            bench = Bench(self.frontend, BenchSpec(
                kinds=kinds, rate=self.spec.rate, duration_s=self.spec.seconds,
                requests=10**9, repeat=self.spec.repeat, timeout_s=self.spec.timeout_s),
                progress=self.progress)
            faults.start()
            report = bench.run().summary()
            self._stop.set()
            faults.join(30)
        finally:
            self._stop.set()
            for child in reversed(list(self.children.values())):
                child.stop()
            self.redis.kill()
        report["faults"] = [{"at_s": round(t, 1), "what": what} for t, what in self.faults]
        report["lost"] = report["no_answer"]
        report["ok_sent_equals_answered"] = (report["sent"] == report["answered"]
                                             and report["no_answer"] == 0
                                             and report["duplicates"] == 0)
        report["logs"] = str(self.dir)
        return report

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with Client(self.frontend, timeout=1.0) as client:
            while time.monotonic() < deadline:
                try:
                    if client.ready(timeout=1.0).get("ready"):
                        return
                except Exception:
                    pass
                for child in self.children.values():
                    if child.popen is not None and child.popen.poll() is not None:
                        raise RuntimeError(f"{child.name} exited at start; see {child.log}")
                time.sleep(0.2)
        raise TimeoutError(f"stack not ready in {timeout:.0f}s; logs in {self.dir}")

    def _faults(self) -> None:
        """Cycle: kill text, kill image, kill Redis; each restarted after ``down_s``."""
        cycle = ["text", "image", "redis"] if "image" in self.children else ["text", "redis"]
        t0 = time.monotonic()
        i = 0
        while not self._stop.wait(self.spec.fault_every_s):
            target = cycle[i % len(cycle)]
            i += 1
            child = self.redis if target == "redis" else self.children[target]
            self.faults.append((time.monotonic() - t0, f"SIGKILL {target}"))
            child.kill()
            if self._stop.wait(self.spec.down_s):
                child.start()
                return
            child.start()


def render(report: dict[str, Any]) -> str:
    """The soak's verdict for people."""
    verdict = "PASS" if report["ok_sent_equals_answered"] else "FAIL"
    statuses = {"200": report["ok"], "429": report["rejected_429"], **report["errors_by_status"]}
    lines = [
        f"{verdict}: sent {report['sent']}, answered {report['answered']}, "
        f"lost {report['lost']}, answered twice {report['duplicates']}",
        "answers by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
        f"cache hit ratio {report['cache_hit_ratio']}, "
        f"latency ms p50 {report['latency_ms']['p50']} p99 {report['latency_ms']['p99']}",
        f"faults injected ({len(report['faults'])}): "
        + ", ".join(f"{f['what']} at {f['at_s']}s" for f in report["faults"]),
        f"logs: {report['logs']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m zembed.tools.soak``: run a soak, print the verdict; non-zero on FAIL."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, default=10.0, help="How long load is sent.")
    ap.add_argument("--rate", type=float, default=SoakSpec.rate, help="Requests/s, open loop.")
    ap.add_argument("--image-args", default=SoakSpec.image_args,
                    help="zembed start image arguments; '' for a text-only soak.")
    ap.add_argument("--fault-every-s", type=float, default=SoakSpec.fault_every_s)
    ap.add_argument("--down-s", type=float, default=SoakSpec.down_s)
    ap.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = ap.parse_args(argv)
    spec = SoakSpec(seconds=args.minutes * 60, rate=args.rate, image_args=args.image_args,
                    fault_every_s=args.fault_every_s, down_s=args.down_s)
    report = Soak(spec, progress=not args.json).run()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["ok_sent_equals_answered"] else 1


if __name__ == "__main__":
    sys.exit(main())

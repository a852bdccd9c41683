"""The broker tier on several (namespaced) hosts: 1, 2 and 3 brokers, and a host cut.

Run as root (network namespaces stand in for hosts, tests/hosts.py):
    .venv/bin/python benchmarks/bench_hosts.py [--seconds 5]

- **Scaling.** Brokers on hosts 1..k (k = 1, 2, 3) and the same two text engines (hosts 1
  and 2) serving all of them; the load generator (``zembed bench``'s, one DEALER connected to
  every broker) runs in the root namespace, the fourth host. All-hit: 1-item requests from a
  small pool, each broker's memory cache warmed first. Engine-bound: 8 distinct items per
  request, cache off. Beside them, the bare ZeroMQ round trip of the same generator against an
  echo ROUTER in the same run: the ratio is what the broker tier costs on top of ZeroMQ.
- **Failover.** Three brokers, a steady load from the SDK client (one connection per broker);
  host 3 is cut off (link down, nothing closed): the time from the cut to the first answer
  of a request that was in flight on host 3 and was resubmitted, and requests lost (must be 0).

Every process shares this machine's cores: the figures say how the tier scales *here*, and
the load generator and brokers compete for the same CPUs.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hosts import Hosts
from stacks import machine

from zembed.client import Client
from zembed.tools import raw as rawmod
from zembed.tools.bench import Bench, BenchSpec

ENGINE = ["--threads", "1", "--credits", "64", "--max-batch", "32",
          "--max-batch-tokens", "8192"]


class Site:
    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def front(self, i: int) -> str:
        return f"tcp://{self.hosts.addr(i)}:5555"

    def back(self, i: int) -> str:
        return f"tcp://{self.hosts.addr(i)}:5556"

    def spawn(self, name: str, i: int, args: list[str]) -> None:
        self.procs[name] = subprocess.Popen(self.hosts.zembed(i, args),
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)

    def brokers(self, k: int, cache: str) -> None:
        for i in range(1, k + 1):
            self.spawn(f"broker{i}", i, [
                "start", "broker", "--frontend", self.front(i), "--backend", self.back(i),
                "--stats-endpoint", f"tcp://{self.hosts.addr(i)}:5557", "--lanes", "text",
                "--cache", cache])

    def engines(self, k: int) -> None:
        for i in (1, 2):
            self.spawn(f"text{i}", i, ["start", "text", "--broker",
                                       ",".join(self.back(b) for b in range(1, k + 1)),
                                       *ENGINE])

    def wait(self, k: int, engines: int, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        for i in range(1, k + 1):
            with Client(self.front(i), timeout=1, retries=0) as c:
                while True:
                    try:
                        live = [e for e in c.stats(timeout=1)["lanes"]["text"]["engines"]
                                if e["alive"]]
                        if len(live) >= engines:
                            break
                    except Exception:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"broker {i}: engines not registered")
                    time.sleep(0.2)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.procs = {}


def load(endpoints: str, seconds: float, *, items: int, repeat: float,
         concurrency: int) -> dict[str, Any]:
    spec = BenchSpec(items=items, concurrency=concurrency, window=1, duration_s=seconds,
                     repeat=repeat, timeout_s=30.0)
    return Bench(endpoints, spec, progress=False).run().summary()


def scaling(hosts: Hosts, seconds: float, engine_conc: int) -> list[dict[str, Any]]:
    rows = []
    for k in (1, 2, 3):
        row: dict[str, Any] = {"brokers": k}
        for mode, cache, items, repeat, conc in (("all_hit", "memory", 1, 1.0, 32),
                                                 ("engine_bound", "off", 8, 0.0, engine_conc)):
            site = Site(hosts)
            try:
                site.brokers(k, cache)
                site.engines(k)
                site.wait(k, 2)
                fronts = ",".join(site.front(i) for i in range(1, k + 1))
                if mode == "all_hit":  # fill every broker's memory cache from the pool
                    for i in range(1, k + 1):
                        load(site.front(i), 2.0, items=items, repeat=repeat, concurrency=8)
                s = load(fronts, seconds, items=items, repeat=repeat, concurrency=conc)
                row[mode] = {"requests_per_s": round(s["requests_per_s"], 1),
                             "items_per_s": round(s["items_per_s"], 1),
                             "p50_ms": round(s["latency_ms"]["p50"], 2),
                             "cached_share": round(s.get("cache_hit_ratio", 0.0), 3),
                             "errors": s["errors"], "rejected": s["rejected_429"]}
            finally:
                site.stop()
        rows.append(row)
        print(row, flush=True)
    return rows


def failover(hosts: Hosts, seconds: float, heartbeat_ms: int) -> dict[str, Any]:
    """Steady SDK load over three brokers; host 3 cut: time to the first resubmitted answer."""
    site = Site(hosts)
    try:
        site.brokers(3, "off")
        site.engines(3)
        site.wait(3, 2)
        fronts = [site.front(i) for i in (1, 2, 3)]
        answered = lost = 0
        first_resubmitted: float | None = None
        cut_at: float | None = None
        with Client(fronts, timeout=30, heartbeat_ms=heartbeat_ms) as c:
            t_end = time.monotonic() + seconds + 8
            n = 0
            while time.monotonic() < t_end:  # bounded by time
                if cut_at is None and time.monotonic() > t_end - 8 - seconds / 2:
                    hosts.cut(3)
                    cut_at = time.monotonic()
                pending = [c.submit("text", "text", [f"failover {n + j}"]) for j in range(6)]
                on_3 = [p.route == site.front(3) for p in pending]
                n += 6
                for p, was_on_3 in zip(pending, on_3, strict=True):
                    try:
                        c.result(p)
                        answered += 1
                    except Exception:
                        lost += 1
                        continue
                    if (was_on_3 and cut_at is not None and first_resubmitted is None
                            and p.route != site.front(3)):
                        first_resubmitted = time.monotonic() - cut_at
            resubmitted = c.resubmitted
        hosts.mend(3)
        return {"client_heartbeat_ms": heartbeat_ms, "answered": answered, "lost": lost,
                "resubmitted": resubmitted,
                "cut_to_first_resubmitted_answer_s": None if first_resubmitted is None
                else round(first_resubmitted, 3)}
    finally:
        site.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--engine-concurrency", type=int, default=12,
                    help="engine-bound: 8-item requests in flight (the two engines hold 128 "
                         "credits in all, split between the brokers)")
    ap.add_argument("--client-heartbeat-ms", type=int, action="append", default=None,
                    help="failover: the client's heartbeat period (repeat for several runs; "
                         "default 1000, the SDK's)")
    ap.add_argument("--only", choices=("scaling", "failover"), default=None)
    args = ap.parse_args()
    beats = args.client_heartbeat_ms or [1000]
    print(f"machine: {machine()}", flush=True)
    raw1 = rawmod.zmq_round_trip("text", 1, 32, 3.0)
    raw8 = rawmod.zmq_round_trip("text", 8, 16, 3.0)
    print(f"bare ZeroMQ echo, same generator: 1 item x 32 in flight "
          f"{raw1['round_trips_per_s']:.0f}/s; 8 items x 16 in flight "
          f"{raw8['round_trips_per_s']:.0f}/s", flush=True)
    hosts = Hosts(3).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rows: list[dict[str, Any]] = []
    try:
        if args.only != "failover":
            rows = scaling(hosts, args.seconds, args.engine_concurrency)
        fos = [failover(hosts, args.seconds, ms) for ms in beats] if args.only != "scaling" \
            else []
    finally:
        hosts.close()
    for fo in fos:
        print(f"failover (host 3 cut under load): {fo}")
    if not rows:
        return
    print("\n| brokers | all-hit req/s | ÷ bare ZeroMQ | engine-bound items/s | ÷ 1 broker "
          "| engine-bound 429s |")
    print("|---|---|---|---|---|---|")
    base = rows[0]["engine_bound"]["items_per_s"] or 1.0
    for r in rows:
        print(f"| {r['brokers']} | {r['all_hit']['requests_per_s']:.0f} | "
              f"{r['all_hit']['requests_per_s'] / raw1['round_trips_per_s']:.2f} | "
              f"{r['engine_bound']['items_per_s']:.0f} | "
              f"{r['engine_bound']['items_per_s'] / base:.2f} | "
              f"{r['engine_bound']['rejected']} |")


if __name__ == "__main__":
    main()

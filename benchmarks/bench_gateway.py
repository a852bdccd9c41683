"""What the HTTP gateway costs (issue 14): the same load via ZeroMQ and via HTTP, in one run.

Starts its own stack on free loopback ports: a broker (text lane, ``--cache off``), one text
engine with default settings, and ``zembed gateway`` in front of the broker. Each case is
driven twice, by ``zembed bench``'s ZeroMQ load generator (:class:`Bench`, straight to the
broker) and by its HTTP one (:class:`HttpBench`, through the gateway), with the same inputs,
and the gateway's figure is given as a ratio of the ZeroMQ one:

(a) 1 item per request, 64 in flight (closed loop);
(b) 32 items per request, 8 in flight (closed loop);
(d) 2x overload: an open loop at twice (a)'s closed-loop capacity of the same path; time to
    429 (client-measured) and goodput (ok items/s) over that capacity;
(c) all-hit cache: the broker is restarted on the same ports with ``--cache memory`` (the
    engine and the gateway reconnect by themselves), the repeat pool is warmed, then 1-item
    requests, all repeats, 64 in flight.

(d) runs before (c) so that both closed-loop cases and the overload see the cache-off broker.
Every load loop is bounded by ``--seconds`` and every process is stopped at the end.

On a 2-core machine the load generator, the gateway, the broker and the engine all compete for
the same cores, so what the gateway spends shows up as engine time lost. ``--pin`` gives the
engine a core of its own (the last one) and puts everything else on the others, as a
deployment with the gateway on its own cores or host would: then the figures show the
gateway's own cost rather than its competition with the model. Each case also reports the
gateway process's CPU (cores busy, and microseconds per request). Usage::

    .venv/bin/python benchmarks/bench_gateway.py [--seconds 8] [--pin]    # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from stacks import Children, machine

from zembed.tools.bench import Bench, BenchSpec
from zembed.tools.httpbench import HttpBench
from zembed.tools.net import free_port

READY_S = 180.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stack(Children):
    """Broker, text engine and gateway as child processes; logs in a temporary folder.

    ``pin``: the engine on the last core, everything else (this process too) on the others.
    """

    def __init__(self, pin: bool = False) -> None:
        super().__init__("bench_gateway.")
        self.fe, self.be, self.st = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        cpus = sorted(os.sched_getaffinity(0))
        self.engine_cpus: set[int] | None = None
        self.other_cpus: set[int] | None = None
        if pin and len(cpus) >= 2:
            self.engine_cpus, self.other_cpus = {cpus[-1]}, set(cpus[:-1])
            os.sched_setaffinity(0, self.other_cpus)

    def gateway_cpu(self) -> float:
        proc = self.procs.get("gateway")
        return 0.0 if proc is None else cpu_seconds(proc.pid)

    def start_broker(self, cache: str) -> None:
        self.spawn("broker", "start", "broker", "--frontend", self.fe, "--backend", self.be,
                   "--stats-endpoint", self.st, "--lanes", "text", "--cache", cache,
                   cpus=self.other_cpus)

    def start(self) -> None:
        self.start_broker("off")
        self.spawn("text", "start", "text", "--broker", self.be, cpus=self.engine_cpus)
        self.spawn("gateway", "gateway", "--broker", self.fe, "--listen",
                   f"127.0.0.1:{self.http_port}", cpus=self.other_cpus)

    def ready(self) -> float:
        """Seconds until the broker says ready (the lane has an engine) and the gateway's
        /ready answers 200."""
        return self.wait_ready(self.fe, READY_S,
                               also=lambda: http_status(self.url + "/ready") == 200)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def measured(bench: Bench | HttpBench, stack: Stack) -> dict[str, Any]:
    """A run's summary plus the load generator's own CPU share (cores busy in this process),
    which says whether it measured the stack or itself, and the gateway's."""
    cpu, gateway = time.process_time(), stack.gateway_cpu()
    out: dict[str, Any] = bench.run().summary()
    elapsed = max(out["elapsed_s"], 1e-9)
    out["client_cpu"] = (time.process_time() - cpu) / elapsed
    out["gateway_cpu"] = (stack.gateway_cpu() - gateway) / elapsed
    out["gateway_us_per_request"] = ((stack.gateway_cpu() - gateway) * 1e6
                                     / max(out["answered"], 1))
    return out


def both(stack: Stack, spec: BenchSpec) -> dict[str, dict[str, Any]]:
    """The same spec via ZeroMQ (to the broker), then via HTTP (through the gateway)."""
    return {"zmq": measured(Bench(stack.fe, spec, progress=False), stack),
            "http": measured(HttpBench(stack.url, spec, progress=False), stack)}


def row(case: str, path: str, s: dict[str, Any], per_item: bool, ratio: float | None) -> str:
    rate = s["items_per_s"] if per_item else s["requests_per_s"]
    lat = s["latency_ms"]
    extra = f" errors {s['errors_by_status']}" if s["errors"] else ""
    gateway = (f"{s['gateway_cpu']:.2f} ({s['gateway_us_per_request']:.0f})"
               if path == "gateway" else "")
    return (f"| {case} | {path} | {rate:,.0f} {'items' if per_item else 'req'}/s | "
            f"{lat['p50']:.1f} | {lat['p99']:.1f} | {s['rejected_pct'] or 0:.1f} | "
            f"{s['client_cpu']:.2f} | {gateway} | {'' if ratio is None else f'{ratio:.2f}'} |"
            f"{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="Length of each measured run.")
    ap.add_argument("--pin", action="store_true",
                    help="Engine on a core of its own, the rest on the others.")
    args = ap.parse_args()
    secs = args.seconds
    stack = Stack(pin=args.pin)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        stack.start()
        where = (f"engine pinned to core {sorted(stack.engine_cpus)}, the rest to "
                 f"{sorted(stack.other_cpus or ())}" if stack.engine_cpus else
                 "client, gateway, broker and engine share the cores")
        print(f"machine: {machine()}; {where}")
        print(f"stack ready in {stack.ready():.1f} s; {secs:g} s per run", flush=True)
        both(stack, BenchSpec(items=1, concurrency=16, duration_s=min(2.0, secs)))  # warm-up

        results["a"] = both(stack, BenchSpec(items=1, concurrency=64, duration_s=secs))
        results["b"] = both(stack, BenchSpec(items=32, concurrency=8, duration_s=secs))
        # (d): twice each path's own closed-loop capacity at 1 item, open loop.
        results["d"] = {}
        makers: tuple[tuple[str, Callable[[BenchSpec], Bench | HttpBench]], ...] = (
            ("zmq", lambda sp: Bench(stack.fe, sp, progress=False)),
            ("http", lambda sp: HttpBench(stack.url, sp, progress=False)))
        for path, make in makers:
            capacity = results["a"][path]["requests_per_s"]
            spec = BenchSpec(items=1, rate=2 * capacity, duration_s=secs,
                             requests=int(2 * capacity * secs) + 1)
            out = measured(make(spec), stack)
            out["capacity_per_s"] = capacity
            results["d"][path] = out

        # (c): the same broker ports, now with a memory cache; engine and gateway reconnect.
        stack.stop("broker")
        stack.start_broker("memory")
        print(f"broker restarted with --cache memory, ready in {stack.ready():.1f} s",
              flush=True)
        warm = BenchSpec(items=1, concurrency=8, repeat=1.0, duration_s=min(3.0, secs))
        both(stack, warm)  # computes and caches the repeat pool (the same in every run)
        results["c"] = both(stack, BenchSpec(items=1, concurrency=64, repeat=1.0,
                                             duration_s=secs))
    except BaseException:
        print(f"failed; logs in {stack.logs}", file=sys.stderr)
        raise
    finally:
        stack.close()
    report(results)


def report(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    cases = {"a": ("(a) 1 item x 64 in flight", True),
             "b": ("(b) 32 items x 8 in flight", True),
             "c": ("(c) all-hit cache, 1 item x 64", False)}
    print("\n| case | path | throughput | p50 ms | p99 ms | 429 % | client CPU | "
          "gateway CPU (us/request) | gateway / ZeroMQ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, (name, per_item) in cases.items():
        zmq, http = results[key]["zmq"], results[key]["http"]
        field = "items_per_s" if per_item else "requests_per_s"
        print(row(name, "ZeroMQ", zmq, per_item, None))
        print(row(name, "gateway", http, per_item, http[field] / max(zmq[field], 1e-9)))
    for key in ("c",):
        print(f"\n(c) cache hit ratio: ZeroMQ {results[key]['zmq']['cache_hit_ratio']}, "
              f"gateway {results[key]['http']['cache_hit_ratio']}")
    print("\n(d) 2x overload, open loop at twice the path's own closed-loop capacity (a), "
          "1 item:")
    print("| path | capacity req/s | offered req/s | goodput items/s | goodput / capacity | "
          "429 % | time to 429 p50 / p99 ms | accepted p50 / p99 ms | client CPU | "
          "gateway CPU (us/request) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path, name in (("zmq", "ZeroMQ"), ("http", "gateway")):
        s = results["d"][path]
        cap = s["capacity_per_s"]
        t429, lat = s["time_to_429_ms"], s["latency_ms"]
        extra = f" errors {s['errors_by_status']}" if s["errors"] else ""
        print(f"| {name} | {cap:,.0f} | {2 * cap:,.0f} | {s['items_per_s']:,.0f} | "
              f"{s['items_per_s'] / max(cap, 1e-9):.2f} | {s['rejected_pct'] or 0:.1f} | "
              f"{t429['p50']:.2f} / {t429['p99']:.2f} | {lat['p50']:.1f} / {lat['p99']:.1f} | "
              f"{s['client_cpu']:.2f} | "
              + (f"{s['gateway_cpu']:.2f} ({s['gateway_us_per_request']:.0f})"
                 if path == "http" else "") + f" |{extra}")


if __name__ == "__main__":
    main()

"""The gateway's own Prometheus metrics, summed over its worker processes.

Each worker counts in plain dicts (no lock: one event loop per worker): requests by route and
status, a latency histogram per route, inputs embedded, requests in flight, and whether its
broker connection is up. With ``--workers N`` the kernel hands a scrape to any one worker, so
each worker also writes its counts to a file of its own in a folder the workers share (every
second, and when it answers a scrape), and ``/metrics`` sums every worker's file: one set of
series for the whole gateway, at most a second stale for the other workers. A worker that dies
leaves its file, so the sums never go down while the gateway runs (``zembed gateway`` removes
the folder when it stops).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

#: Latency histogram buckets, seconds: from a cache hit to a long split request.
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
             30.0, 60.0)


class Metrics:
    """Counters of one worker, and the sum of all workers' for a scrape.

    :param share_dir: the workers' shared folder; None for a gateway of one process.
    """

    def __init__(self, share_dir: str | None = None) -> None:
        self.share_dir = Path(share_dir) if share_dir else None
        self.requests: Counter[tuple[str, int]] = Counter()
        self.inputs: Counter[str] = Counter()
        self.in_flight = 0
        self.connected = False
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, route: str, status: int, seconds: float, inputs: int = 0) -> None:
        """One finished request."""
        self.requests[route, status] += 1
        if inputs:
            self.inputs[route] += inputs
        counts = self._buckets.get(route)
        if counts is None:
            counts = self._buckets[route] = [0] * (len(BUCKETS_S) + 1)
        counts[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self._sums[route] = self._sums.get(route, 0.0) + seconds

    # -- sharing between workers ---------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This worker's counts as JSON-able data."""
        return {"requests": [[r, s, n] for (r, s), n in self.requests.items()],
                "inputs": dict(self.inputs), "buckets": self._buckets, "sums": self._sums,
                "in_flight": self.in_flight, "connected": self.connected}

    def publish(self) -> None:
        """Write this worker's counts for the others (atomically: write, then rename)."""
        if self.share_dir is None:
            return
        path = self.share_dir / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, path)

    def _all(self) -> list[dict[str, Any]]:
        mine = self.snapshot()
        if self.share_dir is None:
            return [mine]
        self.publish()
        out = [mine]
        for path in self.share_dir.glob("*.json"):
            if path.stem == str(os.getpid()):
                continue
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_text()))
        return out

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition text, every worker summed."""
        requests: Counter[tuple[str, int]] = Counter()
        inputs: Counter[str] = Counter()
        buckets: dict[str, list[int]] = {}
        sums: dict[str, float] = {}
        in_flight = connected = 0
        snaps = self._all()
        for snap in snaps:
            for route, status, n in snap["requests"]:
                requests[str(route), int(status)] += int(n)
            inputs.update({str(k): int(v) for k, v in snap["inputs"].items()})
            for route, counts in snap["buckets"].items():
                summed = buckets.setdefault(route, [0] * (len(BUCKETS_S) + 1))
                for i, n in enumerate(counts):
                    summed[i] += int(n)
            for route, seconds in snap["sums"].items():
                sums[route] = sums.get(route, 0.0) + float(seconds)
            in_flight += int(snap["in_flight"])
            connected += int(bool(snap["connected"]))
        out = ["# HELP zembed_gateway_requests_total HTTP requests answered, by route and status.",
               "# TYPE zembed_gateway_requests_total counter"]
        out += [f'zembed_gateway_requests_total{{route="{route}",status="{status}"}} {n}'
                for (route, status), n in sorted(requests.items())]
        out += ["# HELP zembed_gateway_inputs_total Inputs answered with vectors, by route.",
                "# TYPE zembed_gateway_inputs_total counter"]
        out += [f'zembed_gateway_inputs_total{{route="{route}"}} {n}'
                for route, n in sorted(inputs.items())]
        out += ["# HELP zembed_gateway_request_duration_seconds Time from a request's arrival "
                "to its answer.", "# TYPE zembed_gateway_request_duration_seconds histogram"]
        for route, counts in sorted(buckets.items()):
            total = 0
            for bound, n in zip((*BUCKETS_S, float("inf")), counts, strict=True):
                total += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'zembed_gateway_request_duration_seconds_bucket{{route="{route}",'
                           f'le="{le}"}} {total}')
            out.append(f'zembed_gateway_request_duration_seconds_sum{{route="{route}"}} '
                       f"{sums.get(route, 0.0):.6f}")
            out.append(f'zembed_gateway_request_duration_seconds_count{{route="{route}"}} '
                       f"{total}")
        out += ["# HELP zembed_gateway_in_flight Requests being answered now.",
                "# TYPE zembed_gateway_in_flight gauge", f"zembed_gateway_in_flight {in_flight}",
                "# HELP zembed_gateway_workers Worker processes counted in these figures.",
                "# TYPE zembed_gateway_workers gauge", f"zembed_gateway_workers {len(snaps)}",
                "# HELP zembed_gateway_broker_connections Workers whose broker connection is "
                "up.", "# TYPE zembed_gateway_broker_connections gauge",
                f"zembed_gateway_broker_connections {connected}"]
        return ("\n".join(out) + "\n").encode()

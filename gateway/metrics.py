"""The gateway's own Prometheus metrics, rendered in the text exposition format.

Counted per worker process, in plain dicts (no lock: one event loop per worker). Requests by
route and status, a latency histogram per route, requests in flight, inputs embedded, and
whether the broker connection is up. With ``--workers N`` a scrape reaches one worker; each
series carries that worker's ``pid`` label, so sum across pids (docs/http.md).
"""

from __future__ import annotations

import bisect
import os
from collections import Counter

#: Latency histogram buckets, seconds: from a cache hit to a long split request.
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
             30.0, 60.0)


class Metrics:
    """Counters of one worker."""

    def __init__(self) -> None:
        self.pid = str(os.getpid())
        self.requests: Counter[tuple[str, int]] = Counter()
        self.inputs: Counter[str] = Counter()
        self.in_flight = 0
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

    def render(self, broker_connected: bool) -> bytes:
        """The exposition text."""
        pid = f'pid="{self.pid}"'
        out = ["# HELP zembed_gateway_requests_total HTTP requests answered, by route and status.",
               "# TYPE zembed_gateway_requests_total counter"]
        out += [f'zembed_gateway_requests_total{{{pid},route="{route}",status="{status}"}} {n}'
                for (route, status), n in sorted(self.requests.items())]
        out += ["# HELP zembed_gateway_inputs_total Inputs answered with vectors, by route.",
                "# TYPE zembed_gateway_inputs_total counter"]
        out += [f'zembed_gateway_inputs_total{{{pid},route="{route}"}} {n}'
                for route, n in sorted(self.inputs.items())]
        out += ["# HELP zembed_gateway_request_duration_seconds Time from a request's arrival "
                "to its answer.", "# TYPE zembed_gateway_request_duration_seconds histogram"]
        for route, counts in sorted(self._buckets.items()):
            total = 0
            for bound, n in zip((*BUCKETS_S, float("inf")), counts, strict=True):
                total += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'zembed_gateway_request_duration_seconds_bucket{{{pid},'
                           f'route="{route}",le="{le}"}} {total}')
            out.append(f'zembed_gateway_request_duration_seconds_sum{{{pid},route="{route}"}} '
                       f"{self._sums[route]:.6f}")
            out.append(f'zembed_gateway_request_duration_seconds_count{{{pid},route="{route}"}} '
                       f"{total}")
        out += ["# HELP zembed_gateway_in_flight Requests being answered now.",
                "# TYPE zembed_gateway_in_flight gauge",
                f"zembed_gateway_in_flight{{{pid}}} {self.in_flight}",
                "# HELP zembed_gateway_broker_connected 1 while the connection to the broker "
                "is up.", "# TYPE zembed_gateway_broker_connected gauge",
                f"zembed_gateway_broker_connected{{{pid}}} {int(broker_connected)}"]
        return ("\n".join(out) + "\n").encode()

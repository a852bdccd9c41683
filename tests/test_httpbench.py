"""``zembed bench --http``: the HTTP load generator against a real gateway, and its edge cases.

Every run is short and bounded (duration, request count, client timeout); every wait polls
with a deadline; the stacks are stopped by the fixtures whatever happens.
"""

from __future__ import annotations

import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from conftest import Proc, Stack, spawn, wait_until

from zembed.tools.bench import BenchSpec
from zembed.tools.httpbench import HttpBench
from zembed.tools.net import free_port


def get_status(url: str) -> int:
    """HTTP status of a GET (0 when nothing answers), within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def start_gateway(stack: Stack, probe: str = "/ready") -> str:
    """A gateway for ``stack``'s broker (stopped with the stack); its base URL once ``probe``
    answers 200."""
    port = free_port()
    proc: Proc = spawn("gateway", ["gateway", "--broker", stack.frontend, "--listen",
                                   f"127.0.0.1:{port}"])
    stack.procs.append(proc)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: get_status(base + probe) == 200 or not proc.alive(), timeout=60)
    assert proc.alive(), f"gateway exited with {proc.popen.returncode}"
    return base


def test_closed_loop_through_the_gateway_counts_items(
    stack_factory: Callable[[], Stack],
) -> None:
    stack = stack_factory()
    stack.start_broker()
    stack.start_text()
    stack.wait_engines("text", 1)
    base = start_gateway(stack)
    spec = BenchSpec(items=3, concurrency=2, window=2, duration_s=2.0, requests=2000,
                     timeout_s=10.0)
    s = HttpBench(base, spec, progress=False, encoding="float").run().summary()
    assert s["sent"] == s["answered"] == s["ok"] + s["rejected_429"] + s["errors"]
    assert s["ok"] > 0 and s["errors"] == 0, s
    assert s["items_per_s"] == pytest.approx(3 * s["requests_per_s"], rel=0.01)
    assert s["cache_hit_ratio"] == 0.0  # x-zembed-cached read: the broker has no cache
    assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["max"] < 10_000
    assert s["elapsed_s"] < 2.0 + 10.0


def test_open_loop_against_a_gateway_without_broker_is_503_at_once(
    stack_factory: Callable[[], Stack],
) -> None:
    stack = stack_factory()
    broker = stack.start_broker()
    base = start_gateway(stack, probe="/health")
    broker.stop()
    wait_until(lambda: get_status(base + "/health") == 503, timeout=15)
    spec = BenchSpec(rate=100, duration_s=1.5, requests=300, timeout_s=5.0)
    started = time.monotonic()
    s = HttpBench(base, spec, progress=False).run().summary()
    assert time.monotonic() - started < 1.5 + 2.0  # no request waited for its timeout
    assert s["sent"] == s["answered"] > 50
    assert s["errors_by_status"] == {"503": s["sent"]}, s
    assert s["ok"] == s["rejected_429"] == 0


def test_no_answer_within_the_timeout_is_status_0() -> None:
    """A listener that never answers (nor accepts): every request is status 0, on time."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        for spec in (BenchSpec(rate=40, duration_s=0.5, timeout_s=0.3),
                     BenchSpec(concurrency=2, duration_s=0.5, timeout_s=0.3)):
            started = time.monotonic()
            s = HttpBench(url, spec, progress=False).run().summary()
            assert time.monotonic() - started < 0.5 + 0.3 + 1.0
            assert s["sent"] == s["no_answer"] == s["errors"] > 0 and s["ok"] == 0


class FakeGateway(socketserver.ThreadingTCPServer):
    """Answers every request with ``answer`` and, when ``close_after``, closes the connection
    right after it without saying so (as a server whose keep-alive ran out would)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer: bytes, close_after: bool) -> None:
        self.answer, self.close_after = answer, close_after
        self.requests = 0
        super().__init__(("127.0.0.1", 0), FakeHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHandler(socketserver.StreamRequestHandler):
    server: FakeGateway

    def handle(self) -> None:
        self.connection.settimeout(5)
        while True:
            length = 0
            line = self.rfile.readline()
            if not line:
                return
            while line not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                line = self.rfile.readline()
            self.rfile.read(length)
            self.server.requests += 1
            self.wfile.write(self.server.answer)
            if self.server.close_after:
                return


def test_429_backs_off_by_retry_after_ms() -> None:
    body = b'{"error":{}}'
    server = FakeGateway(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\n"
                         b"retry-after-ms: 200\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body), close_after=False)
    try:
        spec = BenchSpec(concurrency=1, duration_s=1.0, timeout_s=2.0)
        s = HttpBench(server.url, spec, progress=False).run().summary()
    finally:
        server.shutdown()
        server.server_close()
    assert 4 <= s["rejected_429"] == s["sent"] <= 6  # one request per 200 ms, not thousands
    assert s["time_to_429_ms"]["p50"] > 0 and s["errors"] == 0


def test_a_kept_alive_connection_closed_by_the_server_is_not_an_error() -> None:
    """The server closes each connection after its answer, unannounced: the request that
    went out on it is sent again on a new connection, never counted as no answer."""
    body = b"x" * 3000
    server = FakeGateway(b"HTTP/1.1 200 OK\r\nx-zembed-cached: 2\r\ncontent-length: %d"
                         b"\r\n\r\n%s" % (len(body), body), close_after=True)
    try:
        spec = BenchSpec(items=2, concurrency=2, duration_s=0.5, timeout_s=2.0)
        s = HttpBench(server.url, spec, progress=False).run().summary()
    finally:
        server.shutdown()
        server.server_close()
    assert s["ok"] == s["sent"] > 5 and s["errors"] == 0, s
    assert s["items_per_s"] == pytest.approx(2 * s["requests_per_s"], rel=0.01)
    assert s["cache_hit_ratio"] == 1.0


def test_images_and_other_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="image"):
        HttpBench("http://127.0.0.1:1", BenchSpec(kinds=("image",)), progress=False)
    with pytest.raises(ValueError, match="URL"):
        HttpBench("tcp://127.0.0.1:1", BenchSpec(), progress=False)


def test_cli_refuses_images_over_http() -> None:
    out = subprocess.run([sys.executable, "-m", "zembed", "bench", "--http",
                          "http://127.0.0.1:1", "--kind", "mix"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "cannot be sent with --http" in out.stderr, out.stderr

"""``zembed bench --http``: the same load, sent to the HTTP gateway instead of the broker.

The figures must be comparable with :class:`~zembed.tools.bench.Bench`'s, so this fills the
same :class:`~zembed.tools.bench.BenchReport` with the same semantics: closed loop
(``concurrency`` x ``window`` slots, each backing off ``retry-after-ms`` after a 429), open loop
(a fixed arrival rate, at most ``OPEN_LOOP_MAX_IN_FLIGHT`` outstanding), status 0 for a request
not answered within ``timeout_s``, every run bounded by its duration and request count.

It must also be as lean as ``Bench``: on a 2-core machine the load generator shares the cores
with the gateway, the broker and the engine, and an HTTP client library (a coroutine, a
response object and a parsed body per request) would measure itself. So: one event loop
(uvloop when installed), raw HTTP/1.1 on keep-alive connections, each request's bytes built
once in one buffer, and a protocol object per connection that parses only the status line
and the three headers it needs (``content-length``, ``retry-after-ms``, ``x-zembed-cached``)
and counts the body bytes without keeping them. The hot path is callbacks, no task or future
per request; the timeouts are one periodic sweep over the busy connections. HTTP/1.1 has no
multiplexing, so one connection carries one request at a time: a closed-loop slot owns a
connection, and the open loop keeps a pool that grows (up to the bound) when a request finds
no idle connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast
from urllib.parse import urlsplit

from zembed import protocol as p
from zembed.tools.bench import (
    NO_ANSWER,
    OPEN_LOOP_MAX_IN_FLIGHT,
    BenchReport,
    BenchSpec,
    show_progress,
)
from zembed.tools.inputs import InputSource

#: Kinds the gateway takes as text (an image over HTTP is a data: URI, not measured here).
HTTP_KINDS = (p.KIND_TEXT, p.KIND_CLIP_TEXT)
#: Path posted to when the URL names none (OpenAI's route).
DEFAULT_PATH = "/v1/embeddings"
#: A response head larger than this is not the gateway's; the connection is dropped.
MAX_HEAD_BYTES = 64 << 10
#: A slot whose connection failed (refused, reset) waits this long before trying again, so a
#: gateway that is down is measured, not hammered in a tight loop, s.
RECONNECT_PAUSE_S = 0.1
#: How often timeouts are swept and the end of the run is checked, s.
SWEEP_S = 0.05
#: Connections opened before the clock starts in open loop (more are opened on demand).
OPEN_LOOP_WARM_CONNECTIONS = 16


def _json_dumps() -> Callable[[Any], bytes]:
    """orjson when installed (the gateway extra has it): the body is built on the hot path."""
    try:
        import orjson

        return orjson.dumps
    except ImportError:  # pragma: no cover - the gateway extra brings orjson
        return lambda obj: json.dumps(obj, separators=(",", ":")).encode()


def _connection_bound() -> int:
    """Most connections the open loop may hold: the bound, within the file-descriptor limit
    (raised to the hard limit when it is lower), less a margin for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_LOOP_MAX_IN_FLIGHT + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    if soft == resource.RLIM_INFINITY:
        return OPEN_LOOP_MAX_IN_FLIGHT
    return max(1, min(OPEN_LOOP_MAX_IN_FLIGHT, soft - 256))


class _Conn(asyncio.Protocol):
    """One keep-alive connection: sends a request, reads the answer's head, skips its body.

    Calls back into the bench when the answer is complete (:meth:`HttpBench._answered`) or
    the connection is gone (:meth:`HttpBench._lost`); it never keeps body bytes.
    """

    def __init__(self, bench: HttpBench) -> None:
        self.bench = bench
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.skip = 0  # body bytes still to come of the current answer
        self.in_body = False
        self.status = 0
        self.cached = 0
        self.retry_ms = 0
        self.close_after = False  # the server will close (or gave no length): do not reuse
        self.sent_at = 0.0
        self.items = 0
        self.busy = False
        self.dead = False
        self.answered = 0  # answers read on this connection
        self.got_bytes = False  # any byte of the current answer
        self.request = b""  # the current request, kept to send again (see HttpBench._lost)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, sent_at: float, items: int) -> None:
        assert self.transport is not None
        self.sent_at, self.items, self.busy = sent_at, items, True
        self.request, self.got_bytes = data, False
        self.buf.clear()
        self.in_body, self.skip = False, 0
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if not self.busy:  # bytes nobody asked for: the connection is out of step
            self.abort()
            return
        if self.in_body:
            self.skip -= len(data)
            if self.skip <= 0:
                self._complete()
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD_BYTES:
                self.abort()
            return
        try:
            length = self._parse_head(bytes(self.buf[:end]))
        except ValueError:  # not an HTTP answer we can read: no answer
            self.abort()
            return
        rest = len(self.buf) - end - 4
        self.buf.clear()
        if length is None:  # no length (chunked, or read-to-close): status known, drop it
            self.close_after = True
            self._complete()
            return
        self.skip = length - rest
        if self.skip <= 0:
            self._complete()
        else:
            self.in_body = True

    def _parse_head(self, head: bytes) -> int | None:
        """Status and the headers the report needs; the body's length (None: unknown)."""
        lines = head.split(b"\r\n")
        try:
            self.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.status = NO_ANSWER
        self.cached = self.retry_ms = 0
        self.close_after = lines[0].startswith(b"HTTP/1.0")
        length: int | None = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"x-zembed-cached":
                self.cached = int(value)
            elif name == b"retry-after-ms":
                self.retry_ms = int(value)
            elif name == b"retry-after" and not self.retry_ms:
                with contextlib.suppress(ValueError):  # an HTTP date: not worth parsing
                    self.retry_ms = int(float(value) * 1000)
            elif name == b"connection":
                self.close_after = value.strip().lower() == b"close"
            elif name == b"transfer-encoding":
                length = None
                break
        return length

    def _complete(self) -> None:
        self.busy = self.in_body = False
        self.answered += 1
        self.bench._answered(self)

    def abort(self) -> None:
        """Drop the connection now (its answer, if any, is no longer wanted)."""
        self.dead = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if self.busy:
            self.busy = False
            self.bench._lost(self)
        else:
            self.bench._forget(self)


class HttpBench:
    """Runs a :class:`BenchSpec` against the gateway's ``/v1/embeddings``; fills a
    :class:`BenchReport` as :class:`~zembed.tools.bench.Bench` does.

    :param url: the gateway, ``http://HOST:PORT`` (the path defaults to ``/v1/embeddings``;
        ``https://`` works too).
    :param model: the ``model`` field of text requests (``text`` = the text lane).
        ``clip-text`` requests go to the CLIP lane, ``"model": "image"``, unless another
        model than the default is named.
    :param encoding: ``encoding_format`` asked for, ``base64`` (what the ``openai`` SDKs
        ask for) or ``float``.
    :param api_key: sent as ``Authorization: Bearer KEY`` when given.
    """

    def __init__(self, url: str, spec: BenchSpec, progress: bool = True, *,
                 model: str = "text", encoding: str = "base64", api_key: str = "") -> None:
        bad = [k for k in spec.kinds if k not in HTTP_KINDS]
        if bad:
            raise ValueError(f"kind {', '.join(bad)} cannot be measured over HTTP; kinds: "
                             f"{', '.join(HTTP_KINDS)}")
        if encoding not in ("float", "base64"):
            raise ValueError(f"encoding must be float or base64, got {encoding!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (ssl.create_default_context()
                                           if parts.scheme == "https" else None)
        path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
        if parts.query:
            path += "?" + parts.query
        self.spec = spec
        self.progress = progress
        self.report = BenchReport()
        self.sources = {k: InputSource(k, spec.repeat, seed=i + 1)
                        for i, k in enumerate(spec.kinds)}
        self.models = {k: ("image" if k == p.KIND_CLIP_TEXT and model == "text" else model)
                       for k in spec.kinds}
        self.encoding = encoding
        netloc = parts.netloc.rpartition("@")[2]
        auth = f"authorization: Bearer {api_key}\r\n" if api_key else ""
        self._head = (f"POST {path} HTTP/1.1\r\nhost: {netloc}\r\n"
                      f"content-type: application/json\r\n{auth}content-length: ").encode()
        self._dumps = _json_dumps()
        self._closed = spec.rate <= 0
        self._bound = _connection_bound() if not self._closed else 0
        self._busy: dict[_Conn, None] = {}  # busy connections, oldest request first
        self._idle: list[_Conn] = []  # open loop: connections free for the next request
        self._connecting = 0  # requests waiting for their connection to open
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._t0 = self._stop_at = 0.0
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- running -------------------------------------------------------------------------

    def run(self) -> BenchReport:
        """Run to completion (bounded by duration and request count) in a loop of its own."""
        main = self._main()
        try:
            import uvloop

            uvloop.run(main)
        except ImportError:  # pragma: no cover - the gateway extra brings uvloop
            asyncio.run(main)
        if self.progress:
            sys.stderr.write("\n")
        return self.report

    async def _main(self) -> None:
        spec = self.spec
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        # Connections are opened before the clock starts: keep-alive clients hold theirs.
        warm = (max(1, spec.concurrency * spec.window) if self._closed
                else min(self._bound, OPEN_LOOP_WARM_CONNECTIONS))
        opened = await asyncio.gather(*(self._connect(spec.timeout_s) for _ in range(warm)))
        self._t0 = time.perf_counter()
        self._stop_at = self._t0 + spec.duration_s
        sweeper = asyncio.ensure_future(self._sweep())
        arrivals: asyncio.Future[None] | None = None
        try:
            if self._closed:
                for conn in opened:
                    self._next(conn)
            else:
                self._idle = [c for c in opened if c is not None]
                arrivals = asyncio.ensure_future(self._arrivals())
            self._maybe_finish()
            await self._done
        finally:
            self.report.elapsed_s = time.perf_counter() - self._t0
            for task in (sweeper, arrivals, *self._tasks):
                if task is not None:
                    task.cancel()
            for conn in list(self._conns):
                conn.abort()
            await asyncio.sleep(0)  # let the aborted transports go

    def _sending(self) -> bool:
        return (self.report.sent < self.spec.requests
                and time.perf_counter() < self._stop_at)

    @property
    def _outstanding(self) -> int:
        return len(self._busy) + self._connecting

    def _maybe_finish(self) -> None:
        if (self._done is not None and not self._done.done() and not self._outstanding
                and not self._sending()):
            self._done.set_result(None)

    async def _connect(self, timeout_s: float) -> _Conn | None:
        """A new connection, or None when it could not be opened within ``timeout_s``."""
        assert self._loop is not None
        try:
            _, conn = await asyncio.wait_for(self._loop.create_connection(
                lambda: _Conn(self), self.host, self.port, ssl=self.ssl), max(timeout_s, 0.001))
        except (OSError, TimeoutError):
            return None
        self._conns.add(conn)
        return conn

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests ------------------------------------------------------------------------

    def _request(self) -> tuple[bytes, int]:
        """The next request's bytes (head and body in one buffer, one write) and its size."""
        spec = self.spec
        kind = spec.kinds[self.report.sent % len(spec.kinds)]
        items = self.sources[kind].take(spec.items)
        request: dict[str, Any] = {"model": self.models[kind], "input": items,
                                   "encoding_format": self.encoding}
        if spec.priority is not None:
            request["priority"] = spec.priority
        body = self._dumps(request)
        return self._head + str(len(body)).encode() + b"\r\n\r\n" + body, len(items)

    def _fire(self, conn: _Conn | None) -> None:
        """Send the next request on ``conn``, or on a new connection when None."""
        data, items = self._request()
        now = time.perf_counter()
        self.report.sent += 1
        if conn is not None and not conn.dead:
            conn.send(data, now, items)
            self._busy[conn] = None
            return
        self._connecting += 1
        self._spawn(self._connect_and_send(data, now, items))

    async def _connect_and_send(self, data: bytes, sent_at: float, items: int) -> None:
        conn = await self._connect(self.spec.timeout_s - (time.perf_counter() - sent_at))
        self._connecting -= 1
        if conn is None:  # refused, unreachable or too slow: no answer
            self.report.statuses[NO_ANSWER] += 1
            self._retry_later()
            return
        conn.send(data, sent_at, items)
        self._busy[conn] = None

    def _next(self, conn: _Conn | None) -> None:
        """A closed-loop slot is free: its next request, or the end of the slot."""
        if self._sending():
            self._fire(conn)
            return
        if conn is not None:
            conn.abort()
        self._maybe_finish()

    def _retry_later(self) -> None:
        """After a failed connection: a closed-loop slot tries again after a pause."""
        if self._closed:
            assert self._loop is not None
            self._loop.call_later(RECONNECT_PAUSE_S, self._next, None)
        self._maybe_finish()

    async def _arrivals(self) -> None:
        """Open loop: one request every 1/rate s, whatever the answers."""
        interval = 1.0 / self.spec.rate
        next_at = self._t0
        while self._sending():
            now = time.perf_counter()
            while next_at <= now and self._sending():
                next_at += interval
                if self._outstanding < self._bound:
                    self._fire(self._idle.pop() if self._idle else None)
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        self._maybe_finish()

    # -- answers (called by _Conn) -------------------------------------------------------

    def _answered(self, conn: _Conn) -> None:
        if conn not in self._busy:  # counted already (cannot happen: an expired one is aborted)
            return
        del self._busy[conn]
        report = self.report
        ms = (time.perf_counter() - conn.sent_at) * 1000
        status = conn.status
        back = 0.0
        if status == p.OK:
            report.ok += 1
            report.items_ok += conn.items
            report.cached_items += conn.cached
            report.latencies_ms.append(ms)
        else:
            report.statuses[status] += 1
            if status == p.OVERLOADED:
                report.reject_ms.append(ms)
                back = max(conn.retry_ms, 1) / 1000
        reuse: _Conn | None = conn
        if conn.close_after:
            conn.abort()
            reuse = None
        if self._closed:
            if back:  # a closed-loop client backs off as told
                assert self._loop is not None
                self._loop.call_later(back, self._next, reuse)
            else:
                self._next(reuse)
        else:
            if reuse is not None:
                self._idle.append(reuse)
            self._maybe_finish()

    def _lost(self, conn: _Conn) -> None:
        """The connection closed before its answer was complete: no answer.

        Except on a kept-alive connection that the server closed as it idled (uvicorn after
        5 s) just as the request went out: nothing of an answer came, so the request is sent
        again on a new connection (as HTTP clients do), its clock still running.
        """
        self._conns.discard(conn)
        if conn not in self._busy:
            return  # already counted (timed out and aborted)
        del self._busy[conn]
        if conn.answered and not conn.got_bytes:
            self._connecting += 1
            self._spawn(self._connect_and_send(conn.request, conn.sent_at, conn.items))
            return
        self.report.statuses[NO_ANSWER] += 1
        self._retry_later()

    def _forget(self, conn: _Conn) -> None:
        """An idle connection closed (by the server, or by us): never hand it out again."""
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    async def _sweep(self) -> None:
        """Every ``SWEEP_S``: requests past the timeout count as no answer (their connection
        is dropped, as the answer may still come), progress, and the end of the run."""
        tick_at = self._t0 + 1.0
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.perf_counter()
            limit = now - self.spec.timeout_s
            while self._busy:
                conn = next(iter(self._busy))  # oldest first (insertion order)
                if conn.sent_at > limit:
                    break
                del self._busy[conn]
                self._conns.discard(conn)
                conn.busy = False
                conn.abort()
                self.report.statuses[NO_ANSWER] += 1
                if self._closed:
                    self._next(None)
            if now >= tick_at:
                tick_at = now + 1.0
                self._tick(now - self._t0)
            self._maybe_finish()

    def _tick(self, secs: float) -> None:
        if self.progress:
            show_progress(self.report, secs)

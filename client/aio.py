"""The asyncio client: a DEALER per broker read from the event loop, a future per request.

Safe to share between any number of coroutines of one event loop (not across loops/threads).

Each DEALER is a plain (non-blocking) pyzmq socket whose file descriptor the event loop
watches, not a ``zmq.asyncio`` socket: zmq.asyncio wraps every send and receive in a future
and its own event bookkeeping, which measured 45 µs of client CPU per request against 25 µs
this way (1-item requests, 64 in flight, all cache hits). The HTTP gateway sends every request
through this client, so that difference is most of what a refusal costs it. ZeroMQ's
descriptor is edge-triggered: it signals "something changed", and only ``EVENTS`` says what.
Every read of ``EVENTS`` (a send, a connection check) may consume that edge, so each one is
followed by a look for replies (:meth:`AsyncClient._events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, cast

import zmq
import zmq.asyncio

from zembed import protocol as p
from zembed.client import link
from zembed.client.bulk import KIND_LANES, BulkPlan, EmbedChunk, Piece, Sizing, seconds_until, total_of
from zembed.client.codec import (
    EmbedResult,
    Vectors,
    decode_embed,
    decode_op,
    embed_frames,
    first_ticket,
    kept_ticket,
    next_id,
    op_frames,
    reply_id,
    retry_delay,
)
from zembed.client.images import image_items
from zembed.client.progress import Assembler, BulkReport, ItemErrorCallback, ProgressCallback
from zembed.errors import ConnectionClosed, EngineUnavailable, ZembedError

#: While no connection is up, a send is tried again this often.
SEND_RETRY_S = 0.02
#: A bulk run without replies or retries due wakes at least this often (to re-read ``info``).
BULK_TICK_S = 0.5


class AsyncClient:
    """asyncio zembed client; the parameters mean what they mean for :class:`Client`."""

    def __init__(self, endpoint: str | Sequence[str] = p.DEFAULT_FRONTEND, *,
                 timeout: float = 10.0,
                 retries: int | None = None, backoff: float = 0.05,
                 ctx: zmq.asyncio.Context | None = None, curve_secret_key: str = "",
                 curve_server_key: str = "", heartbeat_ms: int = link.HEARTBEAT_IVL_MS) -> None:
        self.endpoints = link.endpoints(endpoint)
        self.endpoint = ",".join(self.endpoints)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        # Plain sockets (DEALERs and their drop monitors) in an asyncio context, read by the
        # loop through their descriptors (above).
        context = ctx or zmq.asyncio.Context.instance()

        def make(kind: int) -> zmq.Socket[Any]:
            return zmq.Socket(context, kind)

        self._routes: link.Routes | None = link.Routes(self.endpoints, make, curve_secret_key,
                                                       curve_server_key, heartbeat_ms)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that reads the sockets
        self._fds: list[int] = []  # descriptors the loop watches
        self._futures: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._frames: dict[int, list[bytes]] = {}  # what to send again after a drop
        self._lost: set[int] = set()  # lost with a connection, not yet sent again
        self._resender: asyncio.Task[None] | None = None
        #: Requests sent again after a connection drop (observability, tests).
        self.resubmitted = 0

    @property
    def connected(self) -> bool:
        """A connection to a broker is up now (a request sent now reaches one)."""
        routes = self._routes
        if routes is None:
            return False
        up = False
        for route in routes.all:
            up |= not route.events.down and bool(self._events(route) & zmq.POLLOUT)
        return up

    async def embed_texts(self, texts: Sequence[str], *, normalize: bool = True,
                          dtype: str = "f32", input_type: str | None = None,
                          dimensions: int | None = None, priority: str | None = None,
                          timeout: float | None = None) -> Vectors:
        """Embed texts on the text lane: float32 array ``(len(texts), dim)`` (or
        ``dimensions`` wide; ``priority`` as in :meth:`zembed.client.Client.embed_texts`)."""
        result = await self.embed(p.LANE_TEXT, p.KIND_TEXT, texts, normalize=normalize,
                                  dtype=dtype, input_type=input_type, dimensions=dimensions,
                                  priority=priority, timeout=timeout)
        return result.vectors

    async def embed_images(self, images: Sequence[Any], *, normalize: bool = True,
                           dtype: str = "f32", dimensions: int | None = None,
                           priority: str | None = None,
                           timeout: float | None = None) -> EmbedResult:
        """Embed images on the image lane (CLIP image tower).

        ``images``: bytes, paths (read here), ``data:`` URIs, http(s) URLs (if the engine
        fetches), PIL images or uint8 numpy arrays (sent as PNG). Returns an EmbedResult:
        ``vectors`` (n, dim), and ``item_errors`` for images the engine could not use (their
        rows are zeros); one bad image never fails the others.
        """
        return await self.embed(p.LANE_IMAGE, p.KIND_IMAGE, image_items(images),
                                normalize=normalize, dtype=dtype, dimensions=dimensions,
                                priority=priority, timeout=timeout)

    async def embed_clip_texts(self, texts: Sequence[str], *, normalize: bool = True,
                               dtype: str = "f32", dimensions: int | None = None,
                               priority: str | None = None,
                               timeout: float | None = None) -> Vectors:
        """Embed texts with the CLIP text tower (same space as ``embed_images``)."""
        result = await self.embed(p.LANE_IMAGE, p.KIND_CLIP_TEXT, texts, normalize=normalize,
                                  dtype=dtype, dimensions=dimensions, priority=priority,
                                  timeout=timeout)
        return result.vectors

    async def embed(self, lane: str, kind: str, items: Sequence[Any], *, normalize: bool = True,
                    dtype: str = "f32", input_type: str | None = None,
                    dimensions: int | None = None, priority: str | None = None,
                    timeout: float | None = None) -> EmbedResult:
        """Embed ``items`` of ``kind`` on ``lane``, retrying transient refusals as configured
        (``dimensions`` and ``priority`` as in :meth:`zembed.client.Client.embed`)."""
        t_out = self.timeout if timeout is None else timeout
        give_up = time.monotonic() + t_out
        attempt = 0
        ticket = first_ticket(self.retries)
        refusals = link.Refusals()
        while True:
            try:
                return await self._embed_once(lane, kind, items, normalize, dtype, input_type,
                                              max(give_up - time.monotonic(), 0.001),
                                              dimensions, priority, ticket, refusals)
            except ZembedError as exc:
                ticket = kept_ticket(exc, ticket)
                if (self.retries != 0 and self._routes is not None
                        and time.monotonic() < give_up and refusals.elsewhere(exc, self._routes)):
                    continue  # another broker is up and did not refuse this one yet
                delay = retry_delay(exc, attempt, self.backoff)
                if delay is None or (self.retries is not None and attempt >= self.retries):
                    raise
                if time.monotonic() + delay >= give_up:
                    raise
                attempt += 1
                await asyncio.sleep(delay)

    async def _embed_once(self, lane: str, kind: str, items: Sequence[Any], normalize: bool,
                          dtype: str, input_type: str | None, wait_s: float,
                          dimensions: int | None = None,
                          priority: str | None = None, ticket: int | None = None,
                          refusals: link.Refusals | None = None) -> EmbedResult:
        rid = next_id()
        frames = embed_frames(rid, lane, kind, items, normalize=normalize, dtype=dtype,
                              timeout_s=wait_s, input_type=input_type, dimensions=dimensions,
                              priority=priority, ticket=ticket)
        header, body = await self._request(rid, frames, wait_s, refusals)
        return decode_embed(header, body)

    async def embed_many(self, items: Iterable[Any], kind: str = p.KIND_TEXT, *,
                         normalize: bool = True, dtype: str = "f32",
                         input_type: str | None = None, dimensions: int | None = None,
                         batch_size: int | None = None, in_flight: int | None = None,
                         retry_for: float = 300.0, priority: str = p.PRIORITY_BULK,
                         progress: bool = False,
                         on_progress: ProgressCallback | None = None,
                         on_item_error: ItemErrorCallback | None = None) -> Vectors:
        """Embed any number of inputs: one ``(n, dim)`` array, rows in input order.

        As :meth:`zembed.client.Client.embed_many`; one call keeps the lane busy by itself,
        so there is no need to gather several.
        """
        report = BulkReport(total_of(items), progress=progress, on_progress=on_progress,
                            on_item_error=on_item_error)
        out = Assembler(report.total)
        try:
            async for chunk in self.embed_many_iter(
                    items, kind, normalize=normalize, dtype=dtype, input_type=input_type,
                    dimensions=dimensions, batch_size=batch_size, in_flight=in_flight,
                    retry_for=retry_for, priority=priority):
                report.chunk(chunk)
                out.add(chunk)
        finally:
            report.close()
        return out.array()

    async def embed_many_iter(self, items: Iterable[Any], kind: str = p.KIND_TEXT, *,
                              normalize: bool = True, dtype: str = "f32",
                              input_type: str | None = None, dimensions: int | None = None,
                              batch_size: int | None = None, in_flight: int | None = None,
                              retry_for: float = 300.0, refuse_unadmitted: bool = False,
                              lane: str | None = None,
                              priority: str = p.PRIORITY_BULK) -> AsyncIterator[EmbedChunk]:
        """:meth:`embed_many` as in-order chunks (``offset``, ``vectors``, ``item_errors``,
        ``cached_items``), read from ``items`` only as fast as they are embedded.

        ``refuse_unadmitted``: a lane too full to take any of the run raises its 429
        (:class:`~zembed.client.bulk.BulkPlan`) instead of waiting for room. ``lane``: the
        lane to send to, when not the kind's usual one (a broker's ``--lanes``).
        """
        lane = lane or KIND_LANES[kind]
        bulk = priority == p.PRIORITY_BULK
        plan = BulkPlan(items, kind, await self._sizing(kind, batch_size, in_flight, lane, bulk),
                        retry_for_s=retry_for, backoff_s=self.backoff, dtype=dtype,
                        dimensions=dimensions, refuse_unadmitted=refuse_unadmitted)
        tasks: dict[asyncio.Future[EmbedResult], Piece] = {}
        try:
            while not plan.done:
                if plan.wants_info:
                    plan.resize(await self._sizing(kind, batch_size, in_flight, lane, bulk))
                for piece in plan.take(time.monotonic()):
                    tasks[asyncio.ensure_future(self._embed_once(
                        lane, kind, piece.wire, normalize, dtype, input_type,
                        self.timeout, dimensions, priority, piece.ticket))] = piece
                for chunk in plan.ready():
                    yield chunk
                wait = seconds_until(plan.wake_at(), time.monotonic(), BULK_TICK_S)
                if not tasks:
                    await asyncio.sleep(wait)
                    continue
                done, _ = await asyncio.wait(tasks, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    piece = tasks.pop(task)
                    try:
                        plan.succeeded(piece, task.result())
                    except ZembedError as exc:
                        plan.failed(piece, exc, time.monotonic())
        finally:
            for task in tasks:
                task.cancel()

    async def _sizing(self, kind: str, batch_size: int | None, in_flight: int | None,
                      lane: str | None = None, bulk: bool = True) -> Sizing:
        """Request sizes for ``kind`` on ``lane`` from the broker's ``info`` (or the caller's)."""
        info = await self.info()
        brokers = 1
        if self._routes is not None:
            brokers = self._routes.count_up()
            self._drain_soon()  # reading EVENTS may have taken a reply's edge
        return Sizing.from_info(info, kind, items=batch_size, in_flight=in_flight,
                                brokers=brokers,
                                lane_name=lane, bulk=bulk)

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Round trip to the broker."""
        return await self._op(p.OP_PING, timeout, raise_on_error=True)

    async def health(self, timeout: float | None = None) -> dict[str, Any]:
        """Liveness of the broker loop."""
        return await self._op(p.OP_HEALTH, timeout, raise_on_error=True)

    async def ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Readiness: ``{"ready": bool, "missing": [lanes]}``."""
        return await self._op(p.OP_READY, timeout, raise_on_error=False)

    async def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """A snapshot of the broker's counters."""
        return await self._op(p.OP_STATS, timeout, raise_on_error=True)

    async def info(self, timeout: float | None = None) -> dict[str, Any]:
        """The broker's request limits and, per lane, model, dim and credits (protocol.md)."""
        return await self._op(p.OP_INFO, timeout, raise_on_error=True)

    async def _op(self, op: str, timeout: float | None, *,
                  raise_on_error: bool) -> dict[str, Any]:
        rid = next_id()
        header, body = await self._request(rid, op_frames(rid, op),
                                           self.timeout if timeout is None else timeout)
        return decode_op(header, body, raise_on_error=raise_on_error)

    async def _request(self, rid: int, frames: list[bytes], wait_s: float,
                       refusals: link.Refusals | None = None) -> tuple[dict[str, Any], bytes]:
        """Send and wait for the reply, never past ``wait_s`` (the caller's timeout).

        ``refusals``: the brokers to avoid or prefer (a call's earlier 429s); the broker that
        answered is noted in it."""
        routes = self._routes
        if routes is None:
            raise ConnectionClosed("client is closed")
        self._start_reading(routes)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[dict[str, Any], bytes]] = loop.create_future()
        self._futures[rid] = future
        # A timer per request instead of asyncio.wait_for: wait_for costs a task per call,
        # which at thousands of requests/s is most of the client's CPU.
        timer = loop.call_later(wait_s, self._expire, rid, future)
        try:
            if not await self._send_when_up(rid, frames, future, refusals):
                raise EngineUnavailable(f"broker at {self.endpoint} is not reachable")
            self._frames[rid] = frames
            return await future
        finally:
            timer.cancel()
            self._futures.pop(rid, None)
            self._frames.pop(rid, None)
            self._lost.discard(rid)
            route = routes.done(rid)
            if refusals is not None and route is not None:
                refusals.last = route.endpoint
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "Future exception was never retrieved"
            else:
                future.cancel()

    async def _send_when_up(self, rid: int, frames: list[bytes], future: asyncio.Future[Any],
                            refusals: link.Refusals | None = None) -> bool:
        """Send once a connection is up; False if ``future`` finished first (its timeout).

        Non-blocking tries, ``SEND_RETRY_S`` apart, while no connection is up (IMMEDIATE), rather
        than one send future that waits for the socket to wake it: under load, a request sent
        again after a broker restart once sat that way until its timeout; a loop cannot miss.
        """
        avoid = refusals.avoid if refusals is not None else ()
        prefer = refusals.prefer if refusals is not None else None
        while not future.done() and self._routes is not None:
            route = self._routes.send(rid, frames, avoid, prefer)
            if route is not None:
                self._events(route)  # the send may have taken the edge of a reply that came
                return True
            await asyncio.sleep(SEND_RETRY_S)
        return False

    def _expire(self, rid: int, future: asyncio.Future[Any]) -> None:
        """The caller's timeout: the same errors as the sync client's."""
        if future.done():
            return
        future.set_exception(link.timed_out(
            self.endpoint, reachable=rid not in self._lost and self.connected))

    def _start_reading(self, routes: link.Routes) -> None:
        """Have the running loop watch every DEALER (replies) and monitor (drops)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for route in routes.all:
            for sock, callback in ((route.sock, self._drain), (route.monitor, self._on_link)):
                fd = cast(int, sock.getsockopt(zmq.FD))
                self._loop.add_reader(fd, callback)
                self._fds.append(fd)
        self._on_link()  # events that came before the loop watched

    def _on_link(self) -> None:
        """A monitor spoke: what a lost connection carried is sent again (embedding is pure),
        by a task that waits for a connection; each request's own timer still bounds it."""
        if self._routes is None:
            return
        self._lost.update(rid for rid in self._routes.lost() if rid in self._frames)
        if self._lost and (self._resender is None or self._resender.done()):
            self._resender = asyncio.ensure_future(self._resend_lost())

    async def _resend_lost(self) -> None:
        while self._lost and self._routes is not None:
            for rid in list(self._lost):
                future = self._futures.get(rid)
                frames = self._frames.get(rid)
                if future is None or future.done() or frames is None:
                    self._lost.discard(rid)
                    continue
                route = self._routes.send(rid, frames)
                if route is None:
                    break  # no connection up: wait for one
                self._events(route)
                self.resubmitted += 1
                self._lost.discard(rid)
            if self._lost:
                await asyncio.sleep(SEND_RETRY_S)

    def _drain_soon(self) -> None:
        if self._loop is not None:
            self._loop.call_soon(self._drain)

    def _events(self, route: link.Route) -> int:
        """A DEALER's ``EVENTS``; when replies wait, a drain is scheduled (the read may have
        consumed the descriptor's edge, and the loop would not wake for them)."""
        if route.sock.closed:
            return 0
        events = route.events_now()
        if events & zmq.POLLIN and self._loop is not None:
            self._loop.call_soon(self._drain)
        return events

    def _drain(self) -> None:
        """Every reply that has arrived, to its future (the loop calls this when a socket's
        descriptor signals, and after any read of ``EVENTS``)."""
        routes = self._routes
        if routes is None:
            return
        for route in routes.all:
            sock = route.sock
            while not sock.closed:
                try:
                    if not cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                        break
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except (zmq.Again, zmq.ZMQError):
                    break
                self._deliver(frames)

    def _deliver(self, frames: list[bytes]) -> None:
        rid, header = reply_id(frames)
        future = self._futures.get(rid) if rid is not None else None
        if future is not None and not future.done():
            future.set_result((header, frames[2] if len(frames) > 2 else b""))

    async def close(self) -> None:
        """Stop the reader and close the socket; pending requests fail with ConnectionClosed."""
        if self._loop is not None:
            for fd in self._fds:
                with contextlib.suppress(Exception):  # the loop may be closed already
                    self._loop.remove_reader(fd)
            self._fds = []
            self._loop = None
        if self._resender is not None:
            self._resender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._resender
        for future in self._futures.values():
            if not future.done():
                future.set_exception(ConnectionClosed("client closed"))
        if self._routes is not None:
            self._routes.close()
            self._routes = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

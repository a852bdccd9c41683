"""The synchronous client: a DEALER per broker, many requests in flight, results by request id.

A ``Client`` is not thread-safe (ZeroMQ sockets are not): use one per thread, or one
:class:`~zembed.client.AsyncClient` for many concurrent callers. Within one thread, ``submit``
several requests and then collect them with ``result`` to keep many in flight.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from zembed import protocol as p
from zembed.client import link
from zembed.client.bulk import (
    KIND_LANES,
    BulkPlan,
    EmbedChunk,
    Piece,
    Sizing,
    ceil_ms,
    seconds_until,
    total_of,
)
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
from zembed.client.progress import BulkReport, ItemErrorCallback, ProgressCallback, gather
from zembed.errors import ConnectionClosed, EngineUnavailable, ZembedError

#: A bulk run without replies or retries due wakes at least this often (to re-read ``info``).
BULK_TICK_S = 0.5


@dataclass(slots=True)
class Pending:
    """A submitted request: pass it to :meth:`Client.result`.

    ``deadline`` is the caller's: the client never waits past it.
    """

    id: int
    frames: list[bytes]
    deadline: float
    op: str = p.OP_EMBED
    #: The broker endpoint it was last sent to.
    route: str | None = None


class Client:
    """Synchronous zembed client.

    :param endpoint: broker frontend, e.g. ``tcp://127.0.0.1:5555``; several brokers as a
        list or one comma-separated string: requests are spread over those that are up, and
        those lost with one are sent again to another (``client/link.py``).
    :param timeout: default deadline of each request in seconds: sent to the broker, which
        answers 504 when it passes, and the client never waits longer (``DeadlineExceeded``, or
        ``EngineUnavailable`` when no broker could be reached in that time). Requests lost with
        a broker that died or restarted are resubmitted within it (see ``client/link.py``).
    :param retries: how many times to retry 429 (after ``retry_after``) and 503 (with backoff)
        within the timeout; None (the default) retries them as often as the timeout allows, 0
        raises them at once (for a caller with a fallback of its own).
    :param backoff: first backoff step for retries, seconds.
    :param ctx: ZeroMQ context (the process-wide instance by default).
    :param curve_secret_key: CurveZMQ: this client's ``.key_secret`` file (``zembed keygen``).
    :param curve_server_key: CurveZMQ: the broker's public ``.key`` file. Both or neither.
    :param heartbeat_ms: ZMTP heartbeat period on each broker connection: a broker silent for
        3 periods (host down, link cut) is given up and its requests are resent to another.
        Shorter notices sooner, at a PING per period per broker.
    """

    def __init__(self, endpoint: str | Sequence[str] = p.DEFAULT_FRONTEND, *,
                 timeout: float = 10.0, retries: int | None = None, backoff: float = 0.05,
                 ctx: zmq.Context[Any] | None = None, curve_secret_key: str = "",
                 curve_server_key: str = "", heartbeat_ms: int = link.HEARTBEAT_IVL_MS) -> None:
        self.endpoints = link.endpoints(endpoint)
        self.endpoint = ",".join(self.endpoints)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._routes: link.Routes | None = link.Routes(
            self.endpoints, (ctx or zmq.Context.instance()).socket, curve_secret_key,
            curve_server_key, heartbeat_ms)
        self._replies: dict[int, tuple[dict[str, Any], bytes]] = {}
        self._waiting: dict[int, Pending] = {}
        self._lost: dict[int, Pending] = {}  # sent on a connection that dropped: send again
        #: Requests sent again after a connection drop (observability, tests).
        self.resubmitted = 0

    # -- embedding -------------------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str], *, normalize: bool = True, dtype: str = "f32",
                    input_type: str | None = None, dimensions: int | None = None,
                    priority: str | None = None, timeout: float | None = None) -> Vectors:
        """Embed texts on the text lane: float32 array ``(len(texts), dim)``.

        :param input_type: ``"query"`` or ``"document"`` to apply the engine's prefixes, or the
            name of another prompt of the model (``info()`` lists the lane's ``prompts``).
        :param dimensions: Matryoshka truncation: the first ``dimensions`` values of each
            vector (renormalised when ``normalize``), for a lane whose engine allows it
            (``info()``: ``dimensions``); the result is ``(len(texts), dimensions)``.
        :param priority: ``"interactive"`` (a user waits) or ``"bulk"`` (indexing): bulk
            requests may not take the credits the broker keeps for interactive ones. Left
            out, ``input_type="document"`` is bulk and everything else interactive.
        """
        return self.embed(p.LANE_TEXT, p.KIND_TEXT, texts, normalize=normalize, dtype=dtype,
                          input_type=input_type, dimensions=dimensions, priority=priority,
                          timeout=timeout).vectors

    def embed_images(self, images: Sequence[Any], *, normalize: bool = True,
                     dtype: str = "f32", dimensions: int | None = None,
                     priority: str | None = None, timeout: float | None = None) -> EmbedResult:
        """Embed images on the image lane (CLIP image tower).

        ``images``: bytes, paths (read here), ``data:`` URIs, http(s) URLs (if the engine
        fetches), PIL images or uint8 numpy arrays (sent as PNG). Returns an EmbedResult:
        ``vectors`` (n, dim), and ``item_errors`` for images the engine could not use (their
        rows are zeros); one bad image never fails the others.
        """
        return self.embed(p.LANE_IMAGE, p.KIND_IMAGE, image_items(images), normalize=normalize,
                          dtype=dtype, dimensions=dimensions, priority=priority, timeout=timeout)

    def embed_clip_texts(self, texts: Sequence[str], *, normalize: bool = True,
                         dtype: str = "f32", dimensions: int | None = None,
                         priority: str | None = None, timeout: float | None = None) -> Vectors:
        """Embed texts with the CLIP text tower (same space as ``embed_images``)."""
        result = self.embed(p.LANE_IMAGE, p.KIND_CLIP_TEXT, texts, normalize=normalize,
                            dtype=dtype, dimensions=dimensions, priority=priority,
                            timeout=timeout)
        return result.vectors

    def embed(self, lane: str, kind: str, items: Sequence[Any], *, normalize: bool = True,
              dtype: str = "f32", input_type: str | None = None, dimensions: int | None = None,
              priority: str | None = None, timeout: float | None = None) -> EmbedResult:
        """Embed ``items`` of ``kind`` on ``lane``, retrying transient refusals as configured.

        ``dimensions``: the first ``dimensions`` values of each vector (Matryoshka
        truncation, renormalised when ``normalize``), where the lane's engines allow it.
        ``priority``: ``interactive`` or ``bulk``, as in :meth:`embed_texts`.
        """
        attempt = 0
        t_out = self.timeout if timeout is None else timeout
        give_up = time.monotonic() + t_out
        ticket = first_ticket(self.retries)
        refusals = link.Refusals()
        while True:
            left = give_up - time.monotonic()
            pending = self._embed_pending(lane, kind, items, normalize=normalize, dtype=dtype,
                                          input_type=input_type, dimensions=dimensions,
                                          priority=priority, timeout=max(left, 0.001),
                                          ticket=ticket)
            self._send(pending, refusals.avoid, refusals.prefer)
            try:
                return self.result(pending)
            except ZembedError as exc:
                ticket = kept_ticket(exc, ticket)
                refusals.last = pending.route
                if (self.retries != 0 and time.monotonic() < give_up
                        and refusals.elsewhere(exc, self._open())):
                    continue  # another broker is up and did not refuse this one yet
                delay = retry_delay(exc, attempt, self.backoff)
                if delay is None or (self.retries is not None and attempt >= self.retries):
                    raise
                if time.monotonic() + delay >= give_up:
                    raise
                attempt += 1
                time.sleep(delay)

    def embed_many(self, items: Iterable[Any], kind: str = p.KIND_TEXT, *,
                   normalize: bool = True, dtype: str = "f32", input_type: str | None = None,
                   dimensions: int | None = None, batch_size: int | None = None,
                   in_flight: int | None = None, retry_for: float = 300.0,
                   priority: str = p.PRIORITY_BULK, progress: bool = False,
                   on_progress: ProgressCallback | None = None,
                   on_item_error: ItemErrorCallback | None = None) -> Vectors:
        """Embed any number of inputs: one ``(n, dim)`` array, rows in input order.

        ``items`` is any iterable (a list, or a generator over a file); ``kind`` is ``"text"``,
        ``"clip-text"`` or ``"image"`` (what ``embed_images`` accepts). Requests are sized
        from the broker's ``info`` (or ``batch_size``), ``in_flight`` of them at a time (by
        default enough for every engine of the lane). 429s are retried after the broker's
        ``retry_after``, as long as it takes; 503s and 504s with backoff for up to
        ``retry_for`` seconds; a request too large for the lane is split. Inputs that fail
        (a bad image, an oversized text) do not stop the run: their rows are zeros and they
        go to ``on_item_error(index, status, message)``, or are logged without one.
        ``progress=True`` shows a tqdm bar; ``on_progress(done, total)`` is called per chunk.
        For inputs that do not fit in memory, iterate :meth:`embed_many_iter` instead.
        ``dimensions`` truncates every vector as in :meth:`embed`: the array is
        ``(n, dimensions)`` then. Requests go as ``priority="bulk"``: they never take the
        credits the broker keeps for interactive requests (search queries).
        """
        report = BulkReport(total_of(items), progress=progress, on_progress=on_progress,
                            on_item_error=on_item_error)
        chunks = self.embed_many_iter(items, kind, normalize=normalize, dtype=dtype,
                                      input_type=input_type, dimensions=dimensions,
                                      batch_size=batch_size, in_flight=in_flight,
                                      retry_for=retry_for, priority=priority)
        try:
            return gather(report.each(chunks), report.total)
        finally:
            report.close()

    def embed_many_iter(self, items: Iterable[Any], kind: str = p.KIND_TEXT, *,
                        normalize: bool = True, dtype: str = "f32",
                        input_type: str | None = None, dimensions: int | None = None,
                        batch_size: int | None = None, in_flight: int | None = None,
                        retry_for: float = 300.0,
                        priority: str = p.PRIORITY_BULK) -> Iterator[EmbedChunk]:
        """:meth:`embed_many` as in-order chunks (``offset``, ``vectors``, ``item_errors``,
        ``cached_items``), read from ``items`` only as fast as they are embedded."""
        bulk = priority == p.PRIORITY_BULK
        sizing = self._sizing(kind, batch_size, in_flight, bulk)
        plan = BulkPlan(items, kind, sizing, retry_for_s=retry_for, backoff_s=self.backoff,
                        dtype=dtype, dimensions=dimensions)
        sent: dict[int, tuple[Pending, Piece]] = {}
        try:
            while not plan.done:
                if plan.wants_info:
                    plan.resize(self._sizing(kind, batch_size, in_flight, bulk))
                for piece in plan.take(time.monotonic()):
                    pending = self._submit_piece(plan, piece, normalize, dtype, input_type,
                                                 dimensions, priority)
                    if pending is not None:
                        sent[pending.id] = (pending, piece)
                yield from plan.ready()
                self._collect(plan, sent)
        finally:
            for pending, _ in sent.values():
                self._forget(pending)

    def _sizing(self, kind: str, batch_size: int | None, in_flight: int | None,
                bulk: bool = True) -> Sizing:
        """Request sizes for ``kind`` from the broker's ``info`` (or the caller's)."""
        return Sizing.from_info(self.info(), kind, items=batch_size, in_flight=in_flight,
                                brokers=self._open().count_up(),
                                bulk=bulk)

    def _submit_piece(self, plan: BulkPlan, piece: Piece, normalize: bool, dtype: str,
                      input_type: str | None, dimensions: int | None,
                      priority: str | None = None) -> Pending | None:
        """Send one piece once (the plan retries); None when it failed at once (no broker)."""
        try:
            return self.submit(KIND_LANES[plan.kind], plan.kind, piece.wire,
                               normalize=normalize, dtype=dtype, input_type=input_type,
                               dimensions=dimensions, priority=priority, ticket=piece.ticket)
        except EngineUnavailable as exc:
            plan.failed(piece, exc, time.monotonic())
            return None

    def _collect(self, plan: BulkPlan, sent: dict[int, tuple[Pending, Piece]]) -> None:
        """Wait until a reply is in, a request times out or a retry is due; tell the plan."""
        if not sent:
            wait = seconds_until(plan.wake_at(), time.monotonic(), BULK_TICK_S)
            if wait > 0 and not plan.done:
                time.sleep(wait)
            return
        until = min(min(pd.deadline for pd, _ in sent.values()),
                    time.monotonic() + seconds_until(plan.wake_at(), time.monotonic(),
                                                     BULK_TICK_S))
        while not any(rid in self._replies for rid in sent) and time.monotonic() < until:
            self._pump(until)
        now = time.monotonic()
        for rid in [rid for rid, (pd, _) in sent.items()
                    if rid in self._replies or pd.deadline <= now]:
            pending, piece = sent.pop(rid)
            try:
                result = self.result(pending)
            except ZembedError as exc:
                plan.failed(piece, exc, time.monotonic())
            else:
                plan.succeeded(piece, result)

    def submit(self, lane: str, kind: str, items: Sequence[Any], *, normalize: bool = True,
               dtype: str = "f32", input_type: str | None = None,
               dimensions: int | None = None, priority: str | None = None,
               timeout: float | None = None, ticket: int | None = None) -> Pending:
        """Send an embed request without waiting; collect it with :meth:`result`.

        ``ticket``: 0 to be refused with a ticket, or the ticket of an earlier 429 of this
        request (it keeps its place among requests refused before it; docs/protocol.md).
        """
        pending = self._embed_pending(lane, kind, items, normalize=normalize, dtype=dtype,
                                      input_type=input_type, dimensions=dimensions,
                                      priority=priority, timeout=timeout, ticket=ticket)
        self._send(pending)
        return pending

    def _embed_pending(self, lane: str, kind: str, items: Sequence[Any], *, normalize: bool,
                       dtype: str, input_type: str | None, dimensions: int | None,
                       priority: str | None, timeout: float | None,
                       ticket: int | None) -> Pending:
        t_out = self.timeout if timeout is None else timeout
        rid = next_id()
        frames = embed_frames(rid, lane, kind, items, normalize=normalize, dtype=dtype,
                              timeout_s=t_out, input_type=input_type, dimensions=dimensions,
                              priority=priority, ticket=ticket)
        return Pending(rid, frames, time.monotonic() + t_out)

    def result(self, pending: Pending) -> EmbedResult:
        """Wait for a submitted request: its vectors, or its typed error."""
        header, body = self._wait(pending)
        return decode_embed(header, body)

    # -- management ------------------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Round trip to the broker; raises DeadlineExceeded when it does not answer."""
        return self._op(p.OP_PING, timeout, raise_on_error=True)

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        """Liveness of the broker loop."""
        return self._op(p.OP_HEALTH, timeout, raise_on_error=True)

    def ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Readiness: ``{"ready": bool, "missing": [lanes]}`` (never raises on not-ready)."""
        return self._op(p.OP_READY, timeout, raise_on_error=False)

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """A snapshot of the broker's counters, lanes and engines."""
        return self._op(p.OP_STATS, timeout, raise_on_error=True)

    def info(self, timeout: float | None = None) -> dict[str, Any]:
        """The broker's request limits and, per lane, model, dim and credits (protocol.md)."""
        return self._op(p.OP_INFO, timeout, raise_on_error=True)

    def _op(self, op: str, timeout: float | None, *, raise_on_error: bool) -> dict[str, Any]:
        rid = next_id()
        t_out = self.timeout if timeout is None else timeout
        pending = Pending(rid, op_frames(rid, op), time.monotonic() + t_out, op)
        self._send(pending)
        header, body = self._wait(pending)
        return decode_op(header, body, raise_on_error=raise_on_error)

    # -- plumbing --------------------------------------------------------------------------

    def _open(self) -> link.Routes:
        if self._routes is None:
            raise ConnectionClosed("client is closed")
        return self._routes

    def _send(self, pending: Pending, avoid: Collection[str] = (),
              prefer: str | None = None) -> None:
        """Send on a broker that is up, waiting for one within the request's deadline."""
        routes = self._open()
        self._note_drops()  # a drop seen now concerns what was sent before, not this one
        while True:
            route = routes.send(pending.id, pending.frames, avoid, prefer)
            if route is not None:
                pending.route = route.endpoint
                self._waiting[pending.id] = pending
                return
            if time.monotonic() >= pending.deadline:
                raise EngineUnavailable(f"broker at {self.endpoint} is not reachable")
            self._pump(pending.deadline, writable=True)

    def _wait(self, pending: Pending) -> tuple[dict[str, Any], bytes]:
        try:
            while pending.id not in self._replies:
                if time.monotonic() >= pending.deadline:
                    raise self._gave_up(pending)
                self._pump(pending.deadline)
            return self._replies.pop(pending.id)
        finally:
            self._forget(pending)

    def _forget(self, pending: Pending) -> None:
        """Stop waiting for ``pending``: a late reply to it is dropped."""
        self._waiting.pop(pending.id, None)
        self._lost.pop(pending.id, None)
        self._replies.pop(pending.id, None)
        if self._routes is not None:
            self._routes.done(pending.id)

    def _pump(self, until: float, *, writable: bool = False) -> None:
        """Wait for replies or link events until ``until`` at most, and take them in;
        ``writable``: also wake when a connection is up (a send waits for one)."""
        routes = self._open()
        poller = zmq.Poller()
        # While requests wait to be sent (again), also wake when a connection is up.
        out = zmq.POLLOUT if writable or self._lost else 0
        for route in routes.all:
            poller.register(route.monitor, zmq.POLLIN)
            poller.register(route.sock, zmq.POLLIN | (0 if route.events.down else out))
        events = dict(poller.poll(ceil_ms(until - time.monotonic())))
        if any(route.monitor in events for route in routes.all):
            self._note_drops()
        if self._lost and any(events.get(r.sock, 0) & zmq.POLLOUT for r in routes.all):
            self._resend_lost(routes)
        if any(events.get(r.sock, 0) & zmq.POLLIN for r in routes.all):
            self._drain(routes)

    def _gave_up(self, pending: Pending) -> ZembedError:
        self._note_drops()
        return link.timed_out(self.endpoint, reachable=pending.id not in self._lost
                              and self._open().any_up())

    def _note_drops(self) -> None:
        """Read the monitors; what a lost connection carried is to be sent again."""
        for rid in self._open().lost():
            if rid in self._waiting:
                self._lost[rid] = self._waiting[rid]

    def _resend_lost(self, routes: link.Routes) -> None:
        """Send again what a lost connection took with it, while a connection up has room."""
        now = time.monotonic()
        for rid, pending in list(self._lost.items()):
            if pending.deadline > now:
                route = routes.send(rid, pending.frames)
                if route is None:
                    return
                pending.route = route.endpoint
                self.resubmitted += 1
            del self._lost[rid]

    def _drain(self, routes: link.Routes) -> None:
        for frames in routes.recv():
            rid, header = reply_id(frames)
            # Replies to requests nobody waits for any more (timed out) are dropped here.
            if rid in self._waiting and rid not in self._replies:
                self._replies[rid] = (header, frames[2] if len(frames) > 2 else b"")
                self._lost.pop(rid, None)  # answered after all: nothing to send again

    def close(self) -> None:
        """Close the socket at once (linger 0); later calls raise ConnectionClosed."""
        if self._routes is not None:
            self._routes.close()
            self._routes = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

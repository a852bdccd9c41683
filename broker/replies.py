"""Answers to clients: never blocking, bounded per client, counted by lane and status.

Every send is ``DONTWAIT``. What libzmq queues for one client connection is bounded twice:
by count (``max_replies_queued_per_client``, the frontend's SNDHWM), which is what bounds
small replies, and in bytes for large ones: a reply of ``TRACK_MIN_BYTES`` or more is sent
with a libzmq message tracker, and at most ``max_reply_backlog_bytes`` of them may be queued
(not yet written to the kernel) per client. A count alone cannot do both jobs: 64 replies of
393 KB are 25 MB, while a pipelining client with 64 small requests in flight would hit a
64-message bound all the time (libzmq reports reads in steps of half the HWM) and pay a loop
turn of latency on each (measured: p50 2.8 -> 3.3 ms, -8 % all-hit throughput).

A reply that does not fit waits in this module's own backlog for the client, bounded in bytes
too, and is retried every loop turn (:meth:`Replier.flush`). A client that reads slowly only
waits a little longer. A client that does not read at all fills its backlog and is **cut
off**: its backlog is dropped (counted), later replies to it are dropped instead of queued,
and its new embed requests are refused (:meth:`Replier.refuses`) until a send to it succeeds
again, which shows it reads once more. So what one client can make the broker hold is about
``SNDHWM x TRACK_MIN_BYTES + 2 x max_reply_backlog_bytes`` whatever it does (security.md).

Replies whose request deadline has passed are dropped from the backlog too: the client has
given up on them. The clock and the socket come from outside, so tests drive both.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import zmq

from zembed import protocol as p
from zembed.broker.pending import ClientRequest
from zembed.broker.state import BrokerState
from zembed.cache.bf16 import from_bf16
from zembed.errors import ZembedError
from zembed.messages import reply_header

log = logging.getLogger("zembed.broker")

_EMPTY = b""
#: A reply with no request deadline (management ops, early errors) is held this long at most.
UNTIMED_HOLD_S = p.DEFAULT_DEADLINE_MS / 1000
#: A cut-off client that sent nothing more is forgotten after this long (bounds the table).
CUT_OFF_FORGET_S = 60.0
#: Replies this large are tracked until libzmq has written them out, and bounded in bytes.
TRACK_MIN_BYTES = 16 << 10


class SendSocket(Protocol):
    """The one method of a ROUTER socket the replier uses (a fake one in unit tests)."""

    def send_multipart(self, msg_parts: Any, flags: int = ..., copy: bool = ...,
                       track: bool = ..., **kwargs: Any) -> Any: ...


class Tracker(Protocol):
    """libzmq's message tracker: ``done`` once the message left the queue (written or freed)."""

    @property
    def done(self) -> bool: ...


@dataclass(slots=True)
class Queued:
    """Large replies libzmq still holds for one client, oldest first (they leave in order)."""

    trackers: deque[tuple[Tracker, int]] = field(default_factory=deque)
    size: int = 0

    def prune(self) -> None:
        while self.trackers and self.trackers[0][0].done:
            self.size -= self.trackers.popleft()[1]


@dataclass(slots=True)
class Backlog:
    """Replies waiting for room in one client's libzmq pipe, oldest first."""

    replies: deque[tuple[list[Any], float, int]] = field(default_factory=deque)
    size: int = 0  # bytes held

    def push(self, frames: list[Any], expires: float, size: int) -> None:
        self.replies.append((frames, expires, size))
        self.size += size

    def pop(self) -> None:
        self.size -= self.replies.popleft()[2]


def retry_after_ms(exc: ZembedError) -> int | None:
    """``retry_after_ms`` for the reply to ``exc`` (only an Overloaded carries one)."""
    retry = getattr(exc, "retry_after", None)
    return None if retry is None else math.ceil(retry * 1000)


def _size(frames: list[Any]) -> int:
    return sum(len(f) for f in frames)


class Replier:
    """Sends replies on the frontend ROUTER, holding at most a bounded backlog per client.

    :param frontend: the client ROUTER (``ROUTER_MANDATORY`` on, so a full pipe raises EAGAIN).
    :param state: broker state, for per-lane counting.
    :param counters: the broker's counters (stats); this class adds the backlog's own.
    :param clock: monotonic seconds (``time.monotonic`` in the broker).
    :param max_backlog_bytes: bytes held for one client past libzmq's queue before cut-off.
    """

    def __init__(self, frontend: SendSocket, state: BrokerState, counters: dict[str, int], *,
                 clock: Callable[[], float], max_backlog_bytes: int = 16 << 20) -> None:
        self.frontend = frontend
        self.state = state
        self.counters = counters
        self.clock = clock
        self.max_backlog_bytes = max_backlog_bytes
        self.backlogs: dict[bytes, Backlog] = {}
        self.queued: dict[bytes, Queued] = {}  # large replies inside libzmq, per client
        self.cut_off: dict[bytes, float] = {}  # client -> when it was cut off
        for name in ("replies_deferred", "replies_dropped", "clients_cut_off",
                     "refused_not_reading"):
            counters.setdefault(name, 0)

    # -- sending ---------------------------------------------------------------------------

    def send(self, identity: bytes, frames: list[Any], deadline: float | None = None) -> None:
        """Send now, or hold in the client's backlog; never blocks, never grows unbounded."""
        size = _size(frames)
        backlog = self.backlogs.get(identity)
        if backlog is not None:  # keep order: behind what already waits
            self._hold(identity, backlog, frames, size, deadline)
            if identity in self.backlogs:  # not cut off by this reply
                self._flush_one(identity, backlog, self.clock())
            return
        sent = self._try(identity, frames, size)
        if sent is None:
            if identity in self.cut_off:
                self._dropped(1)
            else:
                backlog = self.backlogs[identity] = Backlog()
                self._hold(identity, backlog, frames, size, deadline)
        elif sent:
            self.cut_off.pop(identity, None)  # it reads again

    def _try(self, identity: bytes, frames: list[Any], size: int) -> bool | None:
        """True if sent, False if the client is gone (counted), None if it has no room."""
        large = size >= TRACK_MIN_BYTES
        queued = self.queued.get(identity) if large else None
        if queued is not None:
            queued.prune()
            if queued.trackers and queued.size + size > self.max_backlog_bytes:
                return None  # libzmq holds enough of this client's bytes already
        try:
            tracker = self.frontend.send_multipart([identity, *frames], zmq.DONTWAIT,
                                                   copy=False, track=large)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EAGAIN:
                return None
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.counters["client_gone"] += 1
            return False
        if large:
            if queued is None:
                queued = self.queued[identity] = Queued()
            queued.trackers.append((tracker, size))
            queued.size += size
        return True

    def _hold(self, identity: bytes, backlog: Backlog, frames: list[Any], size: int,
              deadline: float | None) -> None:
        now = self.clock()
        backlog.push(frames, now + UNTIMED_HOLD_S if deadline is None else deadline, size)
        self.counters["replies_deferred"] += 1
        if backlog.size > self.max_backlog_bytes:
            self._cut(identity, backlog, now)

    def _cut(self, identity: bytes, backlog: Backlog, now: float) -> None:
        """The client reads nothing: drop what it has waiting and refuse its new work."""
        self._drop_backlog(identity, backlog)
        self.cut_off[identity] = now
        self.counters["clients_cut_off"] += 1
        log.warning("client %s is not reading its replies: cut off after %d bytes waiting; "
                    "its embed requests are refused until it reads", identity.hex(),
                    self.max_backlog_bytes)

    def _drop_backlog(self, identity: bytes, backlog: Backlog) -> None:
        self._dropped(len(backlog.replies))
        del self.backlogs[identity]

    def _dropped(self, n: int) -> None:
        self.counters["replies_dropped"] += n

    # -- every loop turn -------------------------------------------------------------------

    def flush(self) -> None:
        """Retry every backlog (oldest first); drop replies past their deadline."""
        now = self.clock()
        for identity, backlog in list(self.backlogs.items()):
            self._flush_one(identity, backlog, now)
        for identity, queued in list(self.queued.items()):
            queued.prune()  # a client that left: libzmq freed its messages
            if not queued.trackers:
                del self.queued[identity]
        if self.cut_off:
            for identity, since in list(self.cut_off.items()):
                if now - since > CUT_OFF_FORGET_S:
                    del self.cut_off[identity]

    def _flush_one(self, identity: bytes, backlog: Backlog, now: float) -> None:
        while backlog.replies:
            frames, expires, size = backlog.replies[0]
            if expires <= now:
                backlog.pop()
                self._dropped(1)
                continue
            sent = self._try(identity, frames, size)
            if sent is None:
                return
            if not sent:  # gone: nothing it waits for can reach it any more
                self._drop_backlog(identity, backlog)
                return
            backlog.pop()
        del self.backlogs[identity]

    @property
    def waiting(self) -> bool:
        """True while some client has replies waiting (the loop then polls briefly)."""
        return bool(self.backlogs)

    def refuses(self, identity: bytes) -> bool:
        """True for a client that was cut off and has not been seen reading since."""
        return identity in self.cut_off

    def snapshot(self) -> dict[str, int]:
        """Gauges for the stats: what is held for clients right now (see stats.md)."""
        return {"backlog_bytes": sum(b.size for b in self.backlogs.values()),
                "backlog_clients": len(self.backlogs),
                "queued_large_bytes": sum(q.size for q in self.queued.values()),
                "cut_off_clients": len(self.cut_off)}

    # -- what to send ----------------------------------------------------------------------

    def error(self, identity: bytes, rid: int | None, lane: str | None, status: int,
              message: str, n: int, *, retry_after_ms: int | None = None,
              started: float | None = None, deadline: float | None = None,
              ticket: int | None = None) -> None:
        """An error reply (empty body), counted under its lane (timed if ``started``)."""
        header = reply_header(rid, status, error=message, retry_after_ms=retry_after_ms,
                              ticket=ticket)
        stats = self.state.count(lane, status, n, len(header))
        if stats is not None and started is not None:
            now = self.clock()
            stats.timed(status, now - started, now)
        self.send(identity, [p.CLIENT_PROTO, header, _EMPTY], deadline)

    def request_error(self, req: ClientRequest, status: int, message: str,
                      retry_after_ms: int | None = None, ticket: int | None = None) -> None:
        """Fail a whole client request (once)."""
        if not req.answered:
            req.answered = True
            self.error(req.client, req.rid, req.lane, status, message, req.n,
                       retry_after_ms=retry_after_ms, started=req.started,
                       deadline=req.deadline, ticket=ticket)

    def vectors(self, req: ClientRequest) -> None:
        """The assembled rows of a complete request, widened to f32 when it asked for f32."""
        if req.answered:
            return
        req.answered = True
        body: Any = bytes(req.rows)
        if req.dtype == p.DTYPE_F32:
            body = from_bf16(np.frombuffer(req.rows, dtype="<u2")).tobytes()
        # The rows are in the body now; a turn's batch keeps its requests until the turn
        # ends, and 512 requests x 256 rows would otherwise stay alive together (100 MB).
        req.rows = bytearray()
        errors = sorted(req.item_errors) or None
        header = reply_header(req.rid, p.OK, dtype=req.dtype, shape=(req.n, req.dim),
                              cached=req.cached, item_errors=errors)
        stats = self.state.count(req.lane, p.OK, req.n, len(header) + len(body))
        if stats is not None:
            now = self.clock()  # not the turn's start: the cache read is part of it
            stats.timed(p.OK, now - req.started, now)
        self.send(req.client, [p.CLIENT_PROTO, header, body], req.deadline)

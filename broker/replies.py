"""Answers to clients: never blocking, bounded per client, counted by lane and status.

Every send is ``DONTWAIT``. libzmq queues at most ``max_replies_queued_per_client`` messages
for one client connection (the frontend's SNDHWM); when that pipe is full the reply waits in
this module's own backlog for the client, bounded in bytes, and is retried every loop turn
(:meth:`Replier.flush`). A client that reads slowly only waits a little longer. A client that
does not read at all fills its backlog and is **cut off**: its backlog is dropped (counted),
later replies to it are dropped instead of queued, and its new embed requests are refused
(:meth:`Replier.refuses`) until a send to it succeeds again, which shows it reads once more.
So what one client can make the broker hold is bounded by
``SNDHWM x largest reply + max_reply_backlog_bytes`` whatever it does (docs/security.md).

Replies whose request deadline has passed are dropped from the backlog too: the client has
given up on them. The clock and the socket come from outside, so tests drive both.
"""

from __future__ import annotations

import logging
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
from zembed.messages import reply_header

log = logging.getLogger("zembed.broker")

_EMPTY = b""
#: A reply with no request deadline (management ops, early errors) is held this long at most.
UNTIMED_HOLD_S = p.DEFAULT_DEADLINE_MS / 1000
#: A cut-off client that sent nothing more is forgotten after this long (bounds the table).
CUT_OFF_FORGET_S = 60.0


class SendSocket(Protocol):
    """The one method of a ROUTER socket the replier uses (a fake one in unit tests)."""

    def send_multipart(self, msg_parts: Any, flags: int = ..., copy: bool = ...,
                       track: bool = ..., **kwargs: Any) -> Any: ...


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
        self.cut_off: dict[bytes, float] = {}  # client -> when it was cut off
        for name in ("replies_deferred", "replies_dropped", "clients_cut_off",
                     "refused_not_reading", "reply_backlog_bytes"):
            counters.setdefault(name, 0)

    # -- sending ---------------------------------------------------------------------------

    def send(self, identity: bytes, frames: list[Any], deadline: float | None = None) -> None:
        """Send now, or hold in the client's backlog; never blocks, never grows unbounded."""
        backlog = self.backlogs.get(identity)
        if backlog is not None:  # keep order: behind what already waits
            self._hold(identity, backlog, frames, deadline)
            if identity in self.backlogs:  # not cut off by this reply
                self._flush_one(identity, backlog, self.clock())
            return
        sent = self._try(identity, frames)
        if sent is None:
            if identity in self.cut_off:
                self._dropped(1)
            else:
                backlog = self.backlogs[identity] = Backlog()
                self._hold(identity, backlog, frames, deadline)
        elif sent:
            self.cut_off.pop(identity, None)  # it reads again

    def _try(self, identity: bytes, frames: list[Any]) -> bool | None:
        """True if sent, False if the client is gone (counted), None if its pipe is full."""
        try:
            self.frontend.send_multipart([identity, *frames], zmq.DONTWAIT, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EAGAIN:
                return None
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.counters["client_gone"] += 1
            return False
        return True

    def _hold(self, identity: bytes, backlog: Backlog, frames: list[Any],
              deadline: float | None) -> None:
        now = self.clock()
        size = _size(frames)
        backlog.push(frames, now + UNTIMED_HOLD_S if deadline is None else deadline, size)
        self.counters["replies_deferred"] += 1
        self.counters["reply_backlog_bytes"] += size
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
        self.counters["reply_backlog_bytes"] -= backlog.size
        del self.backlogs[identity]

    def _dropped(self, n: int) -> None:
        self.counters["replies_dropped"] += n

    # -- every loop turn -------------------------------------------------------------------

    def flush(self) -> None:
        """Retry every backlog (oldest first); drop replies past their deadline."""
        now = self.clock()
        for identity, backlog in list(self.backlogs.items()):
            self._flush_one(identity, backlog, now)
        if self.cut_off:
            for identity, since in list(self.cut_off.items()):
                if now - since > CUT_OFF_FORGET_S:
                    del self.cut_off[identity]

    def _flush_one(self, identity: bytes, backlog: Backlog, now: float) -> None:
        while backlog.replies:
            frames, expires, size = backlog.replies[0]
            if expires <= now:
                backlog.pop()
                self.counters["reply_backlog_bytes"] -= size
                self._dropped(1)
                continue
            sent = self._try(identity, frames)
            if sent is None:
                return
            if not sent:  # gone: nothing it waits for can reach it any more
                self._drop_backlog(identity, backlog)
                return
            backlog.pop()
            self.counters["reply_backlog_bytes"] -= size
        del self.backlogs[identity]

    @property
    def waiting(self) -> bool:
        """True while some client has replies waiting (the loop then polls briefly)."""
        return bool(self.backlogs)

    def refuses(self, identity: bytes) -> bool:
        """True for a client that was cut off and has not been seen reading since."""
        return identity in self.cut_off

    # -- what to send ----------------------------------------------------------------------

    def error(self, identity: bytes, rid: int | None, lane: str | None, status: int,
              message: str, n: int, *, retry_after_ms: int | None = None,
              started: float | None = None, deadline: float | None = None) -> None:
        """An error reply (empty body), counted under its lane (timed if ``started``)."""
        header = reply_header(rid, status, error=message, retry_after_ms=retry_after_ms)
        stats = self.state.count(lane, status, n, len(header))
        if stats is not None and started is not None:
            now = self.clock()
            stats.timed(status, now - started, now)
        self.send(identity, [p.CLIENT_PROTO, header, _EMPTY], deadline)

    def request_error(self, req: ClientRequest, status: int, message: str,
                      retry_after_ms: int | None = None) -> None:
        """Fail a whole client request (once)."""
        if not req.answered:
            req.answered = True
            self.error(req.client, req.rid, req.lane, status, message, req.n,
                       retry_after_ms=retry_after_ms, started=req.started,
                       deadline=req.deadline)

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

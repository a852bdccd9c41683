"""Answers to clients: never blocking, counted by lane and status, latency recorded."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import zmq

from zembed import protocol as p
from zembed.broker.pending import ClientRequest
from zembed.broker.state import BrokerState
from zembed.cache.bf16 import from_bf16
from zembed.messages import reply_header

log = logging.getLogger("zembed.broker")

_EMPTY = b""


class Replier:
    """Sends replies on the frontend ROUTER (DONTWAIT; a vanished client is only counted)."""

    def __init__(self, frontend: zmq.Socket[Any], state: BrokerState,
                 counters: dict[str, int]) -> None:
        self.frontend = frontend
        self.state = state
        self.counters = counters

    def send(self, identity: bytes, frames: list[Any]) -> None:
        """Send without ever blocking; a client that is gone or not reading is counted."""
        try:
            self.frontend.send_multipart([identity, *frames], zmq.DONTWAIT, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self.counters["client_gone"] += 1

    def error(self, identity: bytes, rid: int | None, lane: str | None, status: int,
              message: str, n: int, *, retry_after_ms: int | None = None,
              started: float | None = None) -> None:
        """An error reply (empty body), counted under its lane (timed if ``started``)."""
        header = reply_header(rid, status, error=message, retry_after_ms=retry_after_ms)
        stats = self.state.count(lane, status, n, len(header))
        if stats is not None and started is not None:
            now = time.monotonic()
            stats.timed(status, now - started, now)
        self.send(identity, [p.CLIENT_PROTO, header, _EMPTY])

    def request_error(self, req: ClientRequest, status: int, message: str,
                      retry_after_ms: int | None = None) -> None:
        """Fail a whole client request (once)."""
        if not req.answered:
            req.answered = True
            self.error(req.client, req.rid, req.lane, status, message, req.n,
                       retry_after_ms=retry_after_ms, started=req.started)

    def vectors(self, req: ClientRequest) -> None:
        """The assembled rows of a complete request, widened to f32 when it asked for f32."""
        if req.answered:
            return
        req.answered = True
        body: Any = bytes(req.rows)
        if req.dtype == p.DTYPE_F32:
            body = from_bf16(np.frombuffer(req.rows, dtype="<u2")).tobytes()
        errors = sorted(req.item_errors) or None
        header = reply_header(req.rid, p.OK, dtype=req.dtype, shape=(req.n, req.dim),
                              cached=req.cached, item_errors=errors)
        stats = self.state.count(req.lane, p.OK, req.n, len(header) + len(body))
        if stats is not None:
            now = time.monotonic()  # not the turn's start: the cache read is part of it
            stats.timed(p.OK, now - req.started, now)
        self.send(req.client, [p.CLIENT_PROTO, header, body])

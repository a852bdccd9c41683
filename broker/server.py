"""The broker process: sockets and the poll loop around :class:`BrokerState`.

One thread, one ``zmq.Poller``. Every send is ``DONTWAIT`` with ``ROUTER_MANDATORY`` on, so a
vanished or slow peer raises instead of blocking; the poll timeout never exceeds the next
timer (deadline, heartbeat, expiry). The loop reads as mdbroker's ``mediate``: poll, process
clients, process engines, answer expired, purge dead engines, send heartbeats.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import zmq

from zembed import __version__
from zembed import protocol as p
from zembed.broker.adaptive import parse_targets
from zembed.broker.flow import EmbedFlow, send_engine
from zembed.broker.lanerecord import LaneRecords
from zembed.broker.pending import ClientRequest
from zembed.broker.replies import Replier, retry_after_ms
from zembed.broker.state import BrokerState
from zembed.broker.stats import BrokerStats, ConnectionCounter, StatsPublisher
from zembed.cache.backends import Cache, open_cache
from zembed.config import BrokerConfig
from zembed.errors import BadRequest, Overloaded, ZembedError
from zembed.messages import (
    MAX_ENGINE_HEADER_BYTES,
    HeaderRefused,
    Limits,
    brief,
    packb,
    parse_embed_header,
    parse_items,
    reply_header,
    request_id,
    unpack_header,
)
from zembed.security import BACKEND_DOMAIN, FRONTEND_DOMAIN, BrokerAuth, ServerCurve

log = logging.getLogger("zembed.broker")

#: Messages drained from one socket per loop turn, so neither side starves the other.
DRAIN_BATCH = 512
#: Poll period while some client has replies waiting in the broker's backlog.
BACKLOG_RETRY_S = 0.002
_EMPTY = b""
NOT_READING = ("this connection was cut off for not reading its replies (its backlog was full); "
               "read your replies, then retry")
NOT_READING_RETRY_S = 0.1


class Broker:
    """A zembed broker bound to its frontend and backend endpoints.

    :param cfg: the broker's configuration.
    :param ctx: ZeroMQ context to use (a new one by default; tests may share theirs).
    :param cache: cache backend (by default the one ``cfg.cache`` names).
    """

    def __init__(self, cfg: BrokerConfig, ctx: zmq.Context[Any] | None = None,
                 cache: Cache | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context()
        self.limits = Limits(
            max_items=cfg.max_items, max_item_bytes=cfg.max_item_bytes,
            max_image_bytes=cfg.max_image_bytes, max_request_bytes=cfg.max_request_bytes,
            default_deadline_ms=cfg.default_deadline_ms, max_deadline_ms=cfg.max_deadline_ms)
        self.lane_kinds = {lane: p.LANE_KINDS.get(lane, frozenset({lane})) for lane in cfg.lanes}
        self.state = BrokerState(cfg.lanes, heartbeat_interval_s=cfg.heartbeat_interval_ms / 1000,
                                 liveness=cfg.heartbeat_liveness,
                                 bulk_reserve=cfg.bulk_reserve,
                                 latency_targets=parse_targets(cfg.latency_target_ms, cfg.lanes),
                                 adaptive_min_credits=cfg.adaptive_min_credits)
        self.frontend = self._router(max_message_bytes=cfg.max_message_bytes,
                                     rcvhwm=cfg.max_queued_per_client,
                                     sndhwm=cfg.max_replies_queued_per_client)
        self.backend = self._router(max_message_bytes=-1)
        self.auth: BrokerAuth | None = None
        if cfg.curve_secret_key:  # before bind: only allowed keys ever complete a handshake
            self.auth = BrokerAuth(self.ctx, ServerCurve(
                cfg.curve_secret_key, cfg.curve_clients_dir, cfg.curve_engines_dir))
            self.auth.arm(self.frontend, FRONTEND_DOMAIN)
            self.auth.arm(self.backend, BACKEND_DOMAIN)
        self.started = time.monotonic()
        self.counters = {"client_gone": 0, "bad_client_frames": 0, "bad_engine_frames": 0,
                         "internal_errors": 0}
        self.cache = cache if cache is not None else open_cache(
            cfg.cache, ttl_s=cfg.cache_ttl_s, timeout_s=cfg.cache_timeout_ms / 1000,
            memory_items=cfg.cache_memory_items)
        self.replier = Replier(self.frontend, self.state, self.counters, clock=time.monotonic,
                               max_backlog_bytes=cfg.max_reply_backlog_bytes)
        self.flow = EmbedFlow(self.state, self.cache, self.replier, self.backend,
                              cfg.cache_prefix, clock=time.monotonic)
        self.lane_records = LaneRecords(self.cache, cfg.cache_prefix)
        self.lane_records.restore(cfg.lanes, self.state.models)
        self.stats = BrokerStats(
            self.state, self.flow, self.counters, StatsPublisher(self.ctx, cfg.stats_endpoint),
            ConnectionCounter(self.frontend), interval_s=cfg.stats_interval_s,
            stall_s=cfg.loop_stall_s, now=self.started,
            curve=None if self.auth is None else self.auth.refusals)
        self._batch: list[ClientRequest] = []
        self._running = False

    def _router(self, *, max_message_bytes: int, rcvhwm: int = 100_000,
                sndhwm: int = 100_000) -> zmq.Socket[Any]:
        """A ROUTER with the broker's options.

        ``rcvhwm`` bounds the messages queued per peer before libzmq stops reading from that
        peer's connection: a client flooding faster than the broker can even say no is pushed
        back by TCP instead of growing the broker's memory. ``sndhwm`` bounds what libzmq
        queues towards one peer; past it the Replier's byte-bounded backlog takes over (a
        client that never reads cannot grow the broker). Engines are bounded by credits.
        """
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        return sock

    def bind(self) -> None:
        """Bind the client, engine and stats sockets; endpoints come from the config."""
        self.frontend.bind(self.cfg.frontend)
        self.backend.bind(self.cfg.backend)
        auth = self.auth
        # With CURVE on, the stats socket admits the frontend's clients only.
        self.stats.publisher.bind(None if auth is None else
                                  lambda sock: auth.arm(sock, FRONTEND_DOMAIN))
        log.info("broker %s: clients on %s, engines on %s, lanes %s, cache %s, stats on %s",
                 __version__, self.cfg.frontend, self.cfg.backend, ",".join(self.cfg.lanes),
                 self.cache.name, self.cfg.stats_endpoint if self.stats.publisher.sock else "-")

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop` is called (from a signal handler or another thread)."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.stats.clients.sock, zmq.POLLIN)
        loop = self.stats.loop
        self.stats.watchdog.start()
        self._running = True
        while self._running:
            events = dict(poller.poll(self.poll_timeout_ms(time.monotonic())))
            loop.begin(time.monotonic())
            if self.frontend in events:
                self.process_clients()
            if self.backend in events:
                self.process_engines()
            if self.stats.clients.sock in events:
                self.stats.clients.drain()
            now = time.monotonic()
            self.replier.flush()
            self.answer_expired(now)
            self.purge_dead_engines(now)
            self.send_heartbeats(now)
            self.stats.tick(now)
            loop.end(time.monotonic())
        self.shutdown()

    def poll_timeout_ms(self, now: float) -> int:
        """Until the next timer: heartbeat, engine expiry, client deadline or stats tick."""
        timeout_s = min(self.state.next_timer(now), self.stats.next_due - now)
        deadline = self.flow.pending.next_deadline()
        if deadline is not None:
            timeout_s = min(timeout_s, deadline - now)
        if self.replier.waiting:  # libzmq says nothing when a client's pipe drains: retry soon
            timeout_s = min(timeout_s, BACKLOG_RETRY_S)
        return max(1, math.ceil(timeout_s * 1000))

    def stop(self) -> None:
        """Ask the loop to finish its current turn and shut down."""
        self._running = False

    def shutdown(self) -> None:
        """Answer everything in flight with 503, tell engines, close sockets and cache."""
        self.flow.abort_all("broker shutting down")
        for engine in list(self.state.engines.values()):
            self.send_engine(engine.identity, p.DISCONNECT, {"reason": "broker shutting down"})
        self.stats.close()
        self.frontend.close(linger=0)
        self.backend.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.cache.close()

    # -- clients ---------------------------------------------------------------------------

    def process_clients(self) -> None:
        """Drain what clients sent; then serve this turn's embed requests together."""
        self._drain(self.frontend, self.handle_client, self._reply_internal_error)
        batch, self._batch = self._batch, []
        if batch:
            for identity in self.flow.submit(batch, time.monotonic()):
                self.engine_lost(identity, "unreachable")

    def _reply_internal_error(self, frames: list[zmq.Frame]) -> None:
        """A bug met this message: answer 500 with its id when the id can be read."""
        rid = None
        with contextlib.suppress(Exception):
            rid = request_id(unpack_header(frames[2].bytes))
        self.replier.error(frames[0].bytes, rid, None, p.ENGINE_ERROR, "internal broker error", 0)

    def _drain(self, sock: zmq.Socket[Any], handle: Callable[[list[zmq.Frame]], None],
               on_bug: Callable[[list[zmq.Frame]], None] | None = None) -> None:
        """Handle up to DRAIN_BATCH waiting messages; a bug costs one message, not the broker."""
        for _ in range(DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:
                log.exception("internal error on a message from %s", frames[0].bytes.hex())
                self.counters["internal_errors"] += 1
                if on_bug is not None:
                    with contextlib.suppress(Exception):
                        on_bug(frames)

    def handle_client(self, frames: list[zmq.Frame]) -> None:
        """Validate one client message: answer it, or queue it for this turn's embed batch."""
        identity = frames[0].bytes
        rid: int | None = None
        lane: str | None = None
        n = 0
        try:
            check_client_proto(frames)
            header = unpack_header(frames[2].bytes)
            rid = request_id(header)
            if rid is None:
                raise BadRequest("header field 'id' must be an unsigned 64-bit integer")
            op = header.get("op", p.OP_EMBED)
            if not isinstance(op, str):
                raise BadRequest("header field 'op' must be a string")
            if op in p.MANAGEMENT_OPS:
                check_management_frames(op, frames)
                self.answer_management(identity, rid, op)
                return
            if op != p.OP_EMBED:
                raise BadRequest(f"unknown op {brief(op, 40)}; ops are embed, "
                                 + ", ".join(sorted(p.MANAGEMENT_OPS)))
            if len(frames) != 4:
                raise BadRequest(f"an embed request has 3 frames, got {len(frames) - 1}")
            if self.replier.refuses(identity):
                self.counters["refused_not_reading"] += 1
                raise Overloaded(NOT_READING, retry_after=NOT_READING_RETRY_S)
            fields = parse_embed_header(header, self.lane_kinds, self.limits)
            lane, n = fields.lane, fields.n
            self.state.stats[lane].bytes_in += len(frames[2]) + len(frames[3])
            items = parse_items(frames[3].buffer, fields.kind, n, self.limits)
        except ZembedError as exc:
            if isinstance(exc, HeaderRefused):  # a refused header may still name its id
                rid = exc.rid
            if exc.status == p.BAD_REQUEST:
                self.counters["bad_client_frames"] += 1
            self.replier.error(identity, rid, lane, exc.status, exc.message, n,
                               retry_after_ms=retry_after_ms(exc))
            return
        now = time.monotonic()
        self._batch.append(ClientRequest(
            identity, rid, lane, fields.kind, fields.normalize, fields.dtype, fields.input_type,
            items, now + fields.deadline_ms / 1000, now, fields.dimensions, fields.priority,
            fields.ticket))

    def answer_management(self, identity: bytes, rid: int, op: str) -> None:
        """Answer ping/health/ready/stats/info at once from the loop's own state."""
        now = time.monotonic()
        body: dict[str, Any] = {"version": __version__, "uptime_s": round(now - self.started, 3)}
        status, error = p.OK, None
        if op == p.OP_READY:
            missing, reasons = self.stats.readiness(now)
            body.update(ready=not missing, missing=missing, reasons=reasons,
                        topology=self.stats.topology(now))
            if missing:
                status, error = p.UNAVAILABLE, "not ready: " + "; ".join(reasons)
        elif op == p.OP_STATS:
            body.update(self.stats.snapshot(now))
        elif op == p.OP_INFO:
            body.update(self.info(now))
        elif op == p.OP_HEALTH:
            body.update(status="ok", loop={**self.stats.loop.snapshot(),
                                           "stalls": self.stats.watchdog.stalls})
        self.replier.send(identity, [p.CLIENT_PROTO, reply_header(rid, status, error=error),
                                     packb(body)])

    def info(self, now: float) -> dict[str, Any]:
        """The ``info`` op's answer: request limits and, per lane, model and capacity."""
        lim = self.limits
        limits = {"max_items": lim.max_items, "max_item_bytes": lim.max_item_bytes,
                  "max_image_bytes": lim.max_image_bytes,
                  "max_request_bytes": lim.max_request_bytes,
                  "default_deadline_ms": lim.default_deadline_ms,
                  "max_deadline_ms": lim.max_deadline_ms}
        lanes = {lane: {**self.state.lane_info(lane, now, lim.max_items),
                        "kinds": sorted(self.lane_kinds[lane])} for lane in self.state.lanes}
        return {"limits": limits, "lanes": lanes}

    # -- engines ---------------------------------------------------------------------------

    def process_engines(self) -> None:
        """Drain and handle what engines sent."""
        self._drain(self.backend, self.handle_engine)

    def handle_engine(self, frames: list[zmq.Frame]) -> None:
        """Dispatch one engine message by command; an unknown engine is told to re-register."""
        identity = frames[0].bytes
        if len(frames) < 3 or frames[1].bytes != p.ENGINE_PROTO:
            self.counters["bad_engine_frames"] += 1
            return
        cmd = frames[2].bytes
        now = time.monotonic()
        try:
            header = (unpack_header(frames[3].bytes, MAX_ENGINE_HEADER_BYTES)
                      if len(frames) > 3 else {})
        except BadRequest:
            self.counters["bad_engine_frames"] += 1
            return
        if cmd == p.READY:
            self.register_engine(identity, header, now)
            return
        if cmd == p.DISCONNECT:
            self.engine_lost(identity, "disconnected")
            return
        engine = self.state.touch(identity, now)
        if engine is None:
            # An engine of an earlier broker life (or one we dropped): make it start over.
            if cmd == p.REPLY:
                self.state.late_replies += 1
            self.send_engine(identity, p.DISCONNECT, {"reason": "not registered"})
        elif cmd == p.REPLY and len(frames) == 5:
            self.flow.on_reply(engine, header, frames[4], now)
        elif cmd == p.HEARTBEAT:
            if header and self.state.recredit(engine, header):
                log.info("engine %s of lane %s now gives this broker %d credits (serves %s "
                         "broker(s))", identity.hex(), engine.lane, engine.credits_total,
                         engine.info.get("serving", "?"))
        else:
            self.counters["bad_engine_frames"] += 1

    def register_engine(self, identity: bytes, header: dict[str, Any], now: float) -> None:
        """Admit an engine from READY, or tell it why not (DISCONNECT with a reason)."""
        try:
            engine = self.state.register(identity, header, now)
        except BadRequest as exc:
            log.warning("refused engine %s: %s", identity.hex(), exc.message)
            self.send_engine(identity, p.DISCONNECT, {"reason": exc.message})
            return
        log.info("engine %s joined lane %s: %s dim=%d credits=%d", identity.hex(), engine.lane,
                 engine.info.get("model"), engine.dim, engine.credits_total)
        self.lane_records.publish(engine.lane, self.state.models[engine.lane])
        # Acknowledge at once: an engine gives up a connection it has not heard on within its
        # liveness period, and a READY that a slow (re)connect delivered late would otherwise
        # be heard from only a heartbeat interval later, perhaps after the engine gave up.
        if not self.send_engine(identity, p.HEARTBEAT):
            self.engine_lost(identity, "unreachable")
        if engine.lane not in p.LANE_KINDS:
            # A lane of the operator's own (a second text model, say) serves the kinds its
            # engines announce, besides its own name.
            self.lane_kinds[engine.lane] = self.lane_kinds[engine.lane] | engine.kinds

    def send_engine(self, identity: bytes, cmd: bytes, header: dict[str, Any] | None = None,
                    body: Any = None) -> bool:
        """Send a command to an engine; False if it is unreachable (gone or not reading)."""
        return send_engine(self.backend, identity, cmd, header, body)

    def engine_lost(self, identity: bytes, why: str) -> None:
        """Remove an engine and answer its in-flight requests with 503 at once."""
        engine = self.state.engines.get(identity)
        answered = self.flow.on_engine_lost(self.state.remove(identity), why)
        if engine is not None:
            log.warning("engine %s of lane %s lost (%s); %d request(s) answered 503",
                        identity.hex(), engine.lane, why, answered)

    # -- timers ----------------------------------------------------------------------------

    def answer_expired(self, now: float) -> None:
        """504 for requests past their deadline; their credits stay held until the engine answers."""
        self.flow.expire(now)

    def purge_dead_engines(self, now: float) -> None:
        """Declare engines silent for the liveness period dead."""
        for identity in self.state.dead_engines(now):
            self.engine_lost(identity, "heartbeat expired")

    def send_heartbeats(self, now: float) -> None:
        """Heartbeat engines we sent nothing to for one interval; unreachable ones are lost."""
        for engine in self.state.heartbeat_due(now):
            if not self.send_engine(engine.identity, p.HEARTBEAT):
                self.engine_lost(engine.identity, "unreachable")


def check_client_proto(frames: list[zmq.Frame]) -> None:
    """BadRequest unless frames start [ZEC1, header]; another ZEC version is named as such."""
    if len(frames) < 3:
        raise BadRequest(f"expected frames [{p.CLIENT_PROTO!r}, header, body], "
                         f"got {len(frames) - 1} frame(s)")
    proto = frames[1].bytes
    if proto == p.CLIENT_PROTO:
        return
    if len(proto) == 4 and proto[:3] == p.CLIENT_PROTO[:3]:
        raise BadRequest(f"unsupported protocol version {proto!r}: this broker speaks "
                         f"{p.CLIENT_PROTO!r} only")
    raise BadRequest(f"expected frames [{p.CLIENT_PROTO!r}, header, body]; first frame is "
                     f"{proto[:16]!r}")


def check_management_frames(op: str, frames: list[zmq.Frame]) -> None:
    """A management op is [ZEC1, header] or [ZEC1, header, empty body]; anything else is 400."""
    if len(frames) > 4:
        raise BadRequest(f"op {op!r} takes frames [ZEC1, header] or [ZEC1, header, empty body], "
                         f"got {len(frames) - 1} frames")
    if len(frames) == 4 and len(frames[3]) != 0:
        raise BadRequest(f"op {op!r} takes an empty body frame, got {len(frames[3])} bytes")


def serve(cfg: BrokerConfig) -> None:
    """Run a broker in this process until SIGINT or SIGTERM."""
    broker = Broker(cfg)
    broker.bind()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stop())
    try:
        broker.run()
    finally:
        broker.ctx.term()

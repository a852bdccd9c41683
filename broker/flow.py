"""The embed path of the broker: cache first, then credits, then an engine; and back.

Per loop turn the broker hands :meth:`EmbedFlow.submit` every embed request that arrived
together. They share one cache lookup (one MGET). Each request is then filled from hits,
joined to flights already in the air for the same inputs, and only what is left (each
distinct input once) is admitted by credits and sent to an engine. Replies fill every waiter
and go back to the cache after the clients have their answers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import zmq

from zembed import protocol as p
from zembed.broker.pending import ClientRequest, PendingTable, item_errors_by_position
from zembed.broker.replies import Replier, SendSocket, retry_after_ms
from zembed.broker.state import BrokerState, Engine, Inflight, LaneModel
from zembed.cache.backends import Cache
from zembed.cache.keys import item_keys, key_prefix
from zembed.cache.values import decode_value, encode_value
from zembed.errors import ZembedError
from zembed.messages import packb

log = logging.getLogger("zembed.broker")


def send_engine(backend: SendSocket, identity: bytes, cmd: bytes,
                header: dict[str, Any] | None = None, body: Any = None) -> bool:
    """Send a command to an engine without blocking; False if it is gone or not reading."""
    frames: list[Any] = [identity, p.ENGINE_PROTO, cmd]
    if header is not None:
        frames.append(packb(header))
    if body is not None:
        frames.append(body)
    try:
        backend.send_multipart(frames, zmq.DONTWAIT, copy=False)
    except zmq.ZMQError as exc:
        if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            raise
        return False
    return True


class EmbedFlow:
    """Cache lookup, single-flight, admission and dispatch of embed requests.

    :param state: broker state (engines, credits, in-flight table).
    :param cache: the cache backend (any :class:`~zembed.cache.backends.Cache`).
    :param replier: answers clients.
    :param backend: the engine ROUTER, or anything with its ``send_multipart`` (tests).
    :param cache_prefix: prefix of every cache key.
    :param clock: monotonic seconds; the broker passes ``time.monotonic``, tests a fake.
    """

    def __init__(self, state: BrokerState, cache: Cache, replier: Replier,
                 backend: SendSocket, cache_prefix: str, *,
                 clock: Callable[[], float]) -> None:
        self.clock = clock
        self.state = state
        self.cache = cache
        self.replier = replier
        self.backend = backend
        self.cache_prefix = cache_prefix
        self.pending = PendingTable()
        self.cache_corrupt = 0

    # -- requests in -----------------------------------------------------------------------

    def submit(self, batch: list[ClientRequest], now: float) -> list[bytes]:
        """Serve a turn's requests; returns engines found unreachable while dispatching."""
        batch = [req for req in batch if self.admissible(req)]
        for req in batch:
            model = self.state.models.get(req.lane)
            fingerprint = model.fingerprints.get(req.kind) if model else None
            req.keys = (item_keys(key_prefix(self.cache_prefix, req.kind, fingerprint,
                                             req.normalize, req.input_type, req.dimensions),
                                  req.items)
                        if fingerprint else [None] * req.n)
        hits = self.lookup(batch)
        if hits is None:  # the cache could not be read: every lookup was an error (and a miss)
            hits = {}
            for req in batch:
                errors = self.state.stats[req.lane].cache_errors
                errors[req.kind] = errors.get(req.kind, 0) + sum(k is not None for k in req.keys)
        lost: list[bytes] = []
        for req in batch:
            model = self.state.models.get(req.lane)
            if model is None:  # no engine ever announced this lane's model: nothing to hit
                self.replier.request_error(req, p.UNAVAILABLE,
                                           f"no engine serves lane {req.lane!r} right now")
                continue
            gone = self.serve(req, [hits.get(k) if k else None for k in req.keys],
                              req.dimensions or model.dim, now)
            if gone is not None:
                lost.append(gone)
        return lost

    def admissible(self, req: ClientRequest) -> bool:
        """Check what only the lane's model can judge (its ``dimensions`` and prompts); a
        request it refuses is answered 400 here, before any cache lookup or engine.

        A lane whose model is not known yet passes: it is answered as a lane without engines.
        A ``dimensions`` equal to the model's dim is dropped: the request is a full one then.
        """
        model = self.state.models.get(req.lane)
        if model is None:
            return True
        error = (dimensions_refusal(req.lane, req.dimensions, model)
                 or prompt_refusal(req.lane, req.input_type, model))
        if error is not None:
            self.replier.request_error(req, p.BAD_REQUEST, error)
            return False
        if req.dimensions == model.dim:
            req.dimensions = None
        return True

    def lookup(self, batch: list[ClientRequest]) -> dict[bytes, bytes] | None:
        """One cache round trip for all keys of the batch: key -> BF16 words of valid hits.

        None when the cache could not be read (down, failing): all misses, counted as errors.
        A stored value must have the width the request asks for (its ``dimensions`` or the
        model's dim, which the key implies too); any other is corrupt.
        """
        wanted: dict[bytes, int] = {}
        for req in batch:
            model = self.state.models.get(req.lane)
            for key in req.keys:
                if key is not None and model is not None:
                    wanted[key] = req.dimensions or model.dim
        if not wanted:
            return {}
        keys = list(wanted)
        found: dict[bytes, bytes] = {}
        values = self.cache.get_many(keys)
        if self.cache.read_failed:
            return None
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue
            words = decode_value(value, wanted[key])
            if words is None:
                self.cache_corrupt += 1  # a miss; the computed vector will overwrite it
            else:
                found[key] = words
        return found

    def serve(self, req: ClientRequest, hits: list[bytes | None], dim: int,
              now: float) -> bytes | None:
        """Fill, join, admit, dispatch; returns an engine identity if it proved unreachable."""
        plan = self.pending.plan(req, hits, dim, now)
        stats = self.state.stats[req.lane]
        stats.cache_hits[req.kind] = stats.cache_hits.get(req.kind, 0) + len(req.cached)
        stats.cache_misses[req.kind] = stats.cache_misses.get(req.kind, 0) + (
            req.n - len(req.cached))
        stats.single_flight_joins += req.joined
        if not plan.send:
            if req.missing == 0:
                self.replier.vectors(req)
            else:
                self.pending.track(req)
            return None
        try:
            engine = self.state.admit(req.lane, len(plan.send), now,
                                      bulk=req.priority == p.PRIORITY_BULK, ticket=req.ticket)
        except ZembedError as exc:
            if exc.status == p.OVERLOADED:
                stats.refused_by_class[req.priority] += 1
            self.replier.request_error(req, exc.status, exc.message, retry_after_ms(exc),
                                       getattr(exc, "ticket", None))
            return None
        stats.admitted_by_class[req.priority] += 1
        flight = self.state.dispatch(engine, len(plan.send), req.deadline, now, req.dim)
        self.pending.launch(flight.token, req, plan)
        self.pending.track(req)
        if not self.send_request(engine, flight, req, [req.items[i] for i in plan.send]):
            return engine.identity
        return None

    def send_request(self, engine: Engine, flight: Inflight, req: ClientRequest,
                     items: list[Any]) -> bool:
        header: dict[str, Any] = {
            "tok": flight.token, "kind": req.kind, "normalize": req.normalize, "n": len(items),
            "deadline_ms": max(1, math.ceil((req.deadline - self.clock()) * 1000))}
        if req.input_type is not None:
            header["input_type"] = req.input_type
        if req.dimensions is not None:
            header["dimensions"] = req.dimensions
        if req.priority != p.PRIORITY_INTERACTIVE:
            header["priority"] = req.priority  # the engine puts interactive jobs first
        return send_engine(self.backend, engine.identity, p.REQUEST, header, packb(items))

    # -- engine results in -----------------------------------------------------------------

    def on_reply(self, engine: Engine, header: dict[str, Any], body: zmq.Frame,
                 now: float) -> None:
        """Return credits, fill every waiter of the flight, then write fresh rows back."""
        token = header.get("tok")
        flight = self.state.complete(engine.identity, token, now) if isinstance(token, int) \
            else None
        if flight is None:
            return
        engine.note_reply(header)
        status = header.get("status")
        buf = body.buffer
        if status == p.OK and len(buf) != flight.n * flight.dim * 2:
            status, header = p.ENGINE_ERROR, {
                "error": f"engine sent {len(buf)} bytes for {flight.n}x{flight.dim} bf16"}
        if status != p.OK:
            status = status if status in p.STATUSES else p.ENGINE_ERROR
            for req in self.pending.fail(flight.token):
                self.replier.request_error(req, status, str(header.get("error", "engine error")))
            return
        done, fresh = self.pending.land(flight.token, buf,
                                        item_errors_by_position(header.get("item_errors")))
        for req in done:
            self.replier.vectors(req)
        if fresh:
            self.cache.set_many([(key, encode_value(words, flight.dim)) for key, words in fresh])

    def on_engine_lost(self, flights: list[Inflight], why: str) -> int:
        """503 for every request waiting on the lost engine's flights; how many were answered."""
        answered = 0
        for flight in flights:
            for req in self.pending.fail(flight.token):
                self.replier.request_error(
                    req, p.UNAVAILABLE, f"engine lost ({why}) with the request in flight; "
                    "safe to retry")
                answered += 1
        return answered

    def expire(self, now: float) -> None:
        """504 for requests past their deadline; their flights keep their credits."""
        for req in self.pending.expire(now):
            self.replier.request_error(req, p.DEADLINE_EXCEEDED,
                                       "deadline exceeded while the engine was computing")

    def abort_all(self, why: str) -> None:
        """503 for everything still waiting (broker shutdown)."""
        for token in list(self.pending.flights):
            for req in self.pending.fail(token):
                self.replier.request_error(req, p.UNAVAILABLE, why)


def dimensions_refusal(lane: str, dimensions: int | None, model: LaneModel) -> str | None:
    """Why ``lane``'s model cannot answer a request for ``dimensions`` (None: it can).

    The full dim is always fine (it is the request without ``dimensions``); anything smaller
    needs every engine of the lane to truncate (READY ``dimensions: true``).
    """
    if dimensions is None or dimensions == model.dim:
        return None
    if dimensions > model.dim:
        return (f"dimensions must be at most {model.dim} (the dim of the model of lane "
                f"{lane!r}), got {dimensions}")
    if not model.dimensions:
        return (f"the model of lane {lane!r} does not allow dimensions (Matryoshka "
                f"truncation to fewer than its {model.dim}): leave dimensions out, or have "
                "the operator start the lane's engines with --dimensions on")
    return None


def prompt_refusal(lane: str, input_type: str | None, model: LaneModel) -> str | None:
    """Why ``lane``'s model has no prompt ``input_type`` (None: query, document or a prompt
    its engines announced)."""
    if input_type is None or input_type in p.INPUT_TYPES or input_type in model.prompts:
        return None
    names = ", ".join(sorted(model.prompts)) or "none"
    return (f"unknown prompt {input_type!r} for lane {lane!r}: its model's prompts are "
            f"{names} (input_type may also be " + " or ".join(sorted(p.INPUT_TYPES)) + ")")

"""Broker state without sockets: engines per lane, credits, the in-flight table, deadlines.

The poll loop (:mod:`zembed.broker.server`) feeds events in and sends what these methods
return; everything that decides *who gets what* lives here and is unit-tested on its own.
All times are ``time.monotonic()`` seconds passed in by the caller, so tests control the clock.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zembed import protocol as p
from zembed.broker.adaptive import AimdLimit, for_engine
from zembed.broker.metrics import Histogram, LatencyWindow
from zembed.broker.turns import RetryLine
from zembed.errors import BadRequest, EngineUnavailable, Overloaded, TooLarge, UnknownLane
from zembed.messages import is_prompt_name

#: Window over which a lane's completion rate is measured for ``retry_after_ms``.
RATE_WINDOW_S = 2.0
#: The longest ``retry_after_ms`` the broker suggests: later, a client should just try again.
RETRY_AFTER_MAX_MS = 10_000
#: An engine silent for this many heartbeat intervals has missed a heartbeat: still served
#: (it is dead only after ``liveness`` intervals), but no longer counted as ready.
LIVE_INTERVALS = 2


@dataclass(slots=True)
class Engine:
    """One registered engine: its identity on the backend ROUTER and what it announced."""

    identity: bytes
    lane: str
    kinds: frozenset[str]
    fingerprint: str
    dim: int
    credits_total: int
    max_batch: int
    info: dict[str, Any]
    expires_at: float
    last_sent: float
    credits_free: int = 0
    #: Adaptive credits (a lane with a latency target): the controller, and the announced
    #: credits it holds back now (``credits_total - limit``); admission subtracts them.
    control: AimdLimit | None = None
    withheld: int = 0
    inflight: set[int] = field(default_factory=set)
    requests_done: int = 0
    items_done: int = 0
    batches: int = 0  # the engine's own counters since its process started (REPLY headers)
    batch_items: int = 0
    # Liveness for this engine: it and the broker may run different heartbeat intervals, so we
    # heartbeat it at the shorter one and give it up only after `liveness` of the longer one.
    heartbeat_s: float = p.HEARTBEAT_INTERVAL_MS / 1000
    expiry_s: float = p.HEARTBEAT_INTERVAL_MS / 1000 * p.HEARTBEAT_LIVENESS
    live_s: float = p.HEARTBEAT_INTERVAL_MS / 1000 * 2

    def __post_init__(self) -> None:
        self.credits_free = self.credits_total

    @property
    def credits_limit(self) -> int:
        """Credits the broker lets this engine hold now: its adaptive limit, or all it
        announced (views and refusals; admission subtracts ``withheld`` directly)."""
        return self.credits_total - self.withheld

    def note_reply(self, header: dict[str, Any]) -> None:
        """Take the engine's batch counters from a REPLY header, where it sends them."""
        batches, items = header.get("batches"), header.get("batch_items")
        if type(batches) is int and type(items) is int:
            self.batches, self.batch_items = batches, items


def announced_brokers(info: dict[str, Any]) -> list[str]:
    """The broker endpoints an engine announced in READY that it serves (several: it splits
    its credits between them); [] when it did not say (one broker, an older engine)."""
    brokers = info.get("brokers")
    if not isinstance(brokers, list):
        return []
    return [b for b in brokers if isinstance(b, str)][:64]


def announced_rate(info: dict[str, Any]) -> float | None:
    """An engine's READY ``warmup_items_per_s`` (items per second at full batches, measured
    at its warm-up), if it is a positive finite number; engines are not trusted to send one."""
    value = info.get("warmup_items_per_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


@dataclass(slots=True)
class Inflight:
    """An engine request not yet replied to: it holds ``n`` credits of ``engine``."""

    token: int
    lane: str
    engine: bytes
    n: int
    deadline: float
    started: float
    dim: int = 0  # width of the rows asked for (the request's ``dimensions`` or the full dim)


@dataclass(slots=True)
class LaneModel:
    """What the lane's engines announced: kept after they die, so cache hits still resolve.

    ``dimensions``: every engine of the lane takes a ``dimensions`` request (Matryoshka
    truncation); a request with one may go to any of them. ``prompts``: the named prompts an
    ``input_type`` may select, besides ``query`` and ``document``. ``default_prompt``: the one
    applied when a request names none (informational).
    """

    dim: int
    fingerprints: dict[str, str]
    dimensions: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str | None = None


def announces_dimensions(info: dict[str, Any]) -> bool:
    """An engine's READY ``dimensions``: true only if it says so (missing or junk: false)."""
    return info.get("dimensions") is True


def announced_prompts(info: dict[str, Any]) -> dict[str, str]:
    """An engine's READY ``prompts`` (name -> prompt text); entries that are not str -> str,
    or whose name no ``input_type`` could carry, are ignored (missing: none)."""
    raw = info.get("prompts")
    if not isinstance(raw, dict):
        return {}
    return {name: text for name, text in raw.items()
            if isinstance(name, str) and isinstance(text, str) and is_prompt_name(name)}


def announced_default_prompt(info: dict[str, Any]) -> str | None:
    """An engine's READY ``default_prompt``, if it is a str."""
    value = info.get("default_prompt")
    return value if isinstance(value, str) else None



@dataclass(slots=True)
class LaneStats:
    """Monotonic counters of one lane (by status, in items, in bytes) and its latencies.

    ``latency`` times answered 200s and ``reject`` the 429s (time to say no), both from the
    broker's receipt of the request to its reply.
    """

    requests: dict[int, int] = field(default_factory=lambda: dict.fromkeys(p.STATUSES, 0))
    items: dict[int, int] = field(default_factory=lambda: dict.fromkeys(p.STATUSES, 0))
    items_dispatched: int = 0
    cache_hits: dict[str, int] = field(default_factory=dict)
    cache_misses: dict[str, int] = field(default_factory=dict)
    cache_errors: dict[str, int] = field(default_factory=dict)
    single_flight_joins: int = 0
    late_replies: int = 0
    engines_registered: int = 0
    engines_lost: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    latency: Histogram = field(default_factory=Histogram)
    latency_window: LatencyWindow = field(default_factory=LatencyWindow)
    reject: Histogram = field(default_factory=Histogram)
    reject_window: LatencyWindow = field(default_factory=LatencyWindow)
    #: Requests that needed credits, by class (interactive, bulk): admitted, or refused 429.
    admitted_by_class: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(sorted(p.PRIORITIES), 0))
    refused_by_class: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(sorted(p.PRIORITIES), 0))

    def timed(self, status: int, took_s: float, now: float) -> None:
        """Record how long an answered request took, if its status is one we time."""
        if status == p.OK:
            self.latency.observe(took_s)
            self.latency_window.observe(now, took_s)
        elif status == p.OVERLOADED:
            self.reject.observe(took_s)
            self.reject_window.observe(now, took_s)


class BrokerState:
    """Engines by lane, credit accounting and the in-flight table of one broker."""

    def __init__(
        self,
        lanes: tuple[str, ...],
        *,
        heartbeat_interval_s: float = p.HEARTBEAT_INTERVAL_MS / 1000,
        liveness: int = p.HEARTBEAT_LIVENESS,
        bulk_reserve: float = 0.0,
        latency_targets: dict[str, float] | None = None,
        adaptive_min_credits: int = 0,
    ) -> None:
        self.lanes = lanes
        #: Lanes with adaptive credits: latency target (dispatch to reply) in seconds.
        self.latency_targets = dict(latency_targets or {})
        self.adaptive_min_credits = adaptive_min_credits
        #: Share of each engine's credits that bulk requests may not take.
        self.bulk_reserve = bulk_reserve
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.engines: dict[bytes, Engine] = {}
        self.by_lane: dict[str, list[Engine]] = {lane: [] for lane in lanes}
        self.inflight: dict[int, Inflight] = {}
        self.stats: dict[str, LaneStats] = {lane: LaneStats() for lane in lanes}
        self.late_replies = 0
        #: Credit changes engines announced on HEARTBEAT (their share of several brokers).
        self.recredits = 0
        self.models: dict[str, LaneModel] = {}
        self._tokens = itertools.count(1)
        self._completions: dict[str, deque[tuple[float, int]]] = {lane: deque() for lane in lanes}
        #: Tickets of refused requests by lane, (interactive, bulk): see broker/turns.py.
        self.lines: dict[str, tuple[RetryLine, RetryLine]] = {
            lane: (RetryLine(), RetryLine()) for lane in lanes}

    # -- engines -------------------------------------------------------------------------

    def register(self, identity: bytes, ready: dict[str, Any], now: float) -> Engine:
        """Add an engine from its READY header; raise BadRequest when it cannot join."""
        lane = ready.get("lane")
        if lane not in self.by_lane:
            raise BadRequest(f"engine lane {lane!r} is not served here ({list(self.lanes)})")
        if identity in self.engines:
            raise BadRequest("engine sent READY twice on one connection")
        try:
            kinds = frozenset(str(k) for k in ready["kinds"])
            fingerprint = str(ready["fingerprint"])
            dim, credits = int(ready["dim"]), int(ready["credits"])
            max_batch = int(ready.get("max_batch", credits))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"READY header incomplete: {exc!r}") from None
        if dim <= 0 or credits <= 0:
            raise BadRequest("READY needs positive dim and credits")
        peers = self.by_lane[lane]
        if peers and peers[0].fingerprint != fingerprint:
            # Mixing models in one lane would serve different vectors for the same input.
            raise BadRequest(
                f"lane {lane!r} serves model {peers[0].fingerprint}; engine has {fingerprint}"
            )
        fingerprints = ready.get("fingerprints")
        if not isinstance(fingerprints, dict) or not fingerprints:
            fingerprints = {kind: fingerprint for kind in kinds}
        info = {k: v for k, v in ready.items() if isinstance(k, str)}
        engine = Engine(identity, lane, kinds, fingerprint, dim, credits, max_batch, info,
                        expires_at=now, last_sent=now)
        theirs = ready.get("heartbeat_ms")
        theirs_s = theirs / 1000 if isinstance(theirs, int) and 0 < theirs <= 600_000 else 0.0
        slower = max(self.heartbeat_interval_s, theirs_s)
        engine.heartbeat_s = min(self.heartbeat_interval_s, theirs_s or self.heartbeat_interval_s)
        engine.expiry_s = slower * self.liveness
        engine.live_s = slower * min(LIVE_INTERVALS, self.liveness)
        engine.expires_at = now + engine.expiry_s
        target = self.latency_targets.get(lane)
        if target is not None:
            engine.control = for_engine(target, self.adaptive_min_credits, credits, max_batch)
            engine.withheld = credits - engine.control.limit
        self.engines[identity] = engine
        peers.append(engine)
        self.stats[lane].engines_registered += 1
        self.models[lane] = LaneModel(
            dim, {str(k): str(v) for k, v in fingerprints.items()},
            prompts=announced_prompts(info), default_prompt=announced_default_prompt(info))
        self._refresh_dimensions(lane)
        return engine

    def recredit(self, engine: Engine, header: dict[str, Any]) -> bool:
        """A HEARTBEAT header with ``credits``: an engine serving several brokers moved its
        credits (one of them went or came back). Its work in flight stays; admission sees
        the new total at once (free credits may go below zero until replies return them).
        Returns whether anything changed; a bad value is ignored."""
        credits = header.get("credits")
        serving = header.get("serving")
        if type(serving) is int and serving > 0:
            engine.info["serving"] = serving
        if type(credits) is not int or credits <= 0 or credits == engine.credits_total:
            return False
        engine.credits_free += credits - engine.credits_total
        engine.credits_total = credits
        control = engine.control
        if control is not None:
            control.rebound(credits, self.adaptive_min_credits or engine.max_batch)
            engine.withheld = credits - control.limit
        self.recredits += 1
        return True

    def _refresh_dimensions(self, lane: str) -> None:
        """The lane takes ``dimensions`` while every engine in it does (with none left, what
        the last ones said stands: cache hits may still answer such a request)."""
        model, peers = self.models.get(lane), self.by_lane[lane]
        if model is not None and peers:
            model.dimensions = all(announces_dimensions(e.info) for e in peers)

    def touch(self, identity: bytes, now: float) -> Engine | None:
        """Record that an engine spoke (any message is a heartbeat); None if unknown."""
        engine = self.engines.get(identity)
        if engine is not None:
            engine.expires_at = now + engine.expiry_s
        return engine

    def remove(self, identity: bytes) -> list[Inflight]:
        """Drop an engine (dead, disconnected, unreachable); return its engine requests."""
        engine = self.engines.pop(identity, None)
        if engine is None:
            return []
        self.by_lane[engine.lane].remove(engine)
        self.stats[engine.lane].engines_lost += 1
        self._refresh_dimensions(engine.lane)
        return [self.inflight.pop(t) for t in engine.inflight if t in self.inflight]

    def dead_engines(self, now: float) -> list[bytes]:
        """Identities of engines silent past the liveness expiry."""
        return [e.identity for e in self.engines.values() if e.expires_at <= now]

    def heartbeat_due(self, now: float) -> list[Engine]:
        """Engines that heard nothing from us for one interval; marks them as sent to."""
        due = [e for e in self.engines.values() if now - e.last_sent >= e.heartbeat_s]
        for engine in due:
            engine.last_sent = now
        return due

    # -- admission and dispatch ----------------------------------------------------------

    def reserve(self, engine: Engine) -> int:
        """Credits of ``engine`` that bulk requests may not take (kept for interactive ones).

        Rounded up, and never all of them: an engine of one credit keeps none back.
        """
        limit = engine.credits_limit
        if self.bulk_reserve <= 0 or limit <= 1:
            return 0
        return min(limit - 1, math.ceil(limit * self.bulk_reserve))

    def admit(self, lane: str, n: int, now: float, *, bulk: bool = False,
              ticket: int | None = None) -> Engine:
        """Pick the engine with the most free credits for ``n`` items, or raise the refusal.

        ``bulk``: the request may only use credits above each engine's :meth:`reserve`, so a
        bulk flood always leaves room for interactive requests; interactive ones may use all.
        With adaptive credits, an engine's credits above its current limit (``withheld``) are
        not offered; an idle engine still takes a request larger than its limit (it could
        never fit otherwise), as TCP always lets one segment out.

        ``ticket``: the one a 429 gave this request earlier. Requests refused before come
        first (:class:`~zembed.broker.turns.RetryLine`): a request is admitted only if the
        credits it takes leave enough for the oldest ticket still waiting, unless it holds
        that ticket. A refusal carries the request's ticket (kept, or a new one).
        """
        peers = self.by_lane.get(lane)
        if peers is None:
            raise UnknownLane(f"unknown lane {lane!r}")
        if not peers:
            raise EngineUnavailable(f"no engine serves lane {lane!r} right now")
        keep = self.reserve if bulk else (lambda e: 0)
        best = max(peers, key=lambda e: e.credits_free - e.withheld - keep(e))
        room = best.credits_free - best.withheld - keep(best)
        line = self.lines[lane][bulk]
        waits = line.must_wait(ticket, n, room, now)
        if room >= n and not waits:
            line.admitted(ticket)
            return best
        for idle in peers:
            if (idle.withheld and not idle.inflight and idle.credits_total - keep(idle) >= n
                    and not waits):
                line.admitted(ticket)
                return idle
        biggest = max(e.credits_total - keep(e) for e in peers)
        if n > biggest:
            raise TooLarge(
                f"{n} items exceed the largest engine budget of lane {lane!r} ({biggest}"
                + (" for bulk requests" if bulk else "") + "); split it"
            )
        free = best.credits_free - best.withheld
        if best.control is not None and best.withheld:
            best.control.wanted = True  # refused under the limit: it may grow
        retry_s = self.retry_after_ms(lane, n + keep(best) + best.withheld, now) / 1000
        ahead = line.ahead(ticket)
        if ahead:
            retry_s = min(RETRY_AFTER_MAX_MS / 1000, retry_s + ahead / self._drain_rate(lane, now))
        number = line.refused(ticket, n, retry_s, now)
        if room >= n:
            why = f"keeps its credits for requests refused earlier ({ahead} items ahead)"
        elif bulk and free >= n:
            why = (f"has no room for bulk work ({free} free, {keep(best)} kept for interactive "
                   f"requests, {n} needed)")
        else:
            why = (f"is out of credits ({max(0, free)} free"
                   + (f" under the adaptive limit {best.credits_limit}"
                      if best.control is not None else "") + f", {n} needed)")
        raise Overloaded(f"lane {lane!r} {why}", retry_after=retry_s, ticket=number)

    def dispatch(self, engine: Engine, n: int, deadline: float, now: float,
                 dim: int | None = None) -> Inflight:
        """Take ``n`` credits from ``engine`` and record the engine request as in flight.

        ``dim`` is the width of the rows it asks for (a ``dimensions`` request's), by default
        the engine's full dim: its REPLY must carry ``n x dim`` words.
        """
        req = Inflight(next(self._tokens), engine.lane, engine.identity, n, deadline, now,
                       dim or engine.dim)
        engine.credits_free -= n
        engine.inflight.add(req.token)
        engine.last_sent = now
        self.inflight[req.token] = req
        self.stats[engine.lane].items_dispatched += n
        return req

    def complete(self, identity: bytes, token: int, now: float) -> Inflight | None:
        """An engine replied: return credits; None (and counted) if the reply is late/unknown."""
        req = self.inflight.get(token)
        if req is None or req.engine != identity:
            self.late_replies += 1
            return None
        del self.inflight[token]
        engine = self.engines[identity]
        engine.inflight.discard(token)
        engine.credits_free += req.n
        engine.requests_done += 1
        engine.items_done += req.n
        control = engine.control
        if control is not None and control.sample(
                now - req.started, req.n, req.started,
                engine.credits_total - engine.credits_free, now):
            engine.withheld = engine.credits_total - control.limit
        window = self._completions[req.lane]
        window.append((now, req.n))
        while window and window[0][0] < now - RATE_WINDOW_S:
            window.popleft()
        return req

    # -- estimates and views -------------------------------------------------------------

    def lane_rate(self, lane: str, now: float) -> float:
        """Items per second the lane completed over the last ``RATE_WINDOW_S``."""
        window = self._completions[lane]
        while window and window[0][0] < now - RATE_WINDOW_S:
            window.popleft()
        return sum(n for _, n in window) / RATE_WINDOW_S

    def retry_after_ms(self, lane: str, n: int, now: float) -> int:
        """Milliseconds until an engine of ``lane`` is expected to have ``n`` free credits.

        Two estimates, and the sooner counts. Measured: while the lane completes work
        (anything in the last ``RATE_WINDOW_S``), the credits missing on the engine with the
        most free, divided by that rate. Announced: each engine's in-flight requests are
        assumed to complete in order at the throughput it announced in READY
        (:meth:`free_in`), and the soonest engine counts. The measured rate is low for a lane
        that was idle for part of the window (a bulk run starting up was told 2 s for what took
        20 ms), and the announced one may be high for long inputs; a retry that comes too early
        costs one cheap 429, one that comes too late leaves an engine idle. With neither: one
        heartbeat interval, the longest the broker goes without hearing from each engine.
        Bounded to 1 ms … 10 s.
        """
        peers = self.by_lane.get(lane, [])
        rate = self.lane_rate(lane, now)
        waits = [w for e in peers if (w := self.free_in(e, n, now)) is not None]
        if rate > 0:
            missing = n - max((e.credits_free for e in peers), default=0)
            waits.append(missing / rate)
        wait_s = min(waits) if waits else self.heartbeat_interval_s
        # (rounded first, so that float noise in 0.15 s does not make it 151 ms)
        return max(1, min(RETRY_AFTER_MAX_MS, math.ceil(round(wait_s * 1000, 6))))

    def _drain_rate(self, lane: str, now: float) -> float:
        """Items per second the lane can be expected to complete: the measured rate, or the
        engines' announced throughputs if higher (a lane just starting has measured little);
        at least 1."""
        announced = sum(announced_rate(e.info) or 0.0 for e in self.by_lane[lane])
        return max(1.0, self.lane_rate(lane, now), announced)

    def free_in(self, engine: Engine, n: int, now: float) -> float | None:
        """Seconds until ``engine`` has ``n`` free credits, from the throughput it announced.

        Its in-flight requests are taken in dispatch order, each done ``n ÷ warmup_items_per_s``
        after the one before it (or after its own dispatch, if the engine was idle then); the
        answer is when enough of them are done to free the missing credits. When that moment
        has passed (the engine is behind its announced pace), the time the missing credits
        take at that pace from now. ``None`` when the engine announced no usable throughput,
        or ``n`` is more than it ever has.
        """
        rate = announced_rate(engine.info)
        if rate is None or n > engine.credits_total:
            return None
        need = n - engine.credits_free
        if need <= 0:
            return 0.0
        queued = sorted((self.inflight[t] for t in engine.inflight if t in self.inflight),
                        key=lambda r: (r.started, r.token))
        done_at, freed = -math.inf, 0
        for req in queued:
            done_at = max(done_at, req.started) + req.n / rate
            freed += req.n
            if freed >= need:
                break
        if freed >= need and done_at > now:
            return done_at - now
        return need / rate

    def next_timer(self, now: float) -> float:
        """Seconds until a heartbeat or an engine expiry is due, >= 0."""
        due = now + self.heartbeat_interval_s
        for engine in self.engines.values():
            due = min(due, engine.expires_at, engine.last_sent + engine.heartbeat_s)
        return max(0.0, due - now)

    def heard_age(self, engine: Engine, now: float) -> float:
        """Seconds since ``engine`` last sent anything (any message is a heartbeat)."""
        return now - (engine.expires_at - engine.expiry_s)

    def is_live(self, engine: Engine, now: float) -> bool:
        """Registered (so warmed up) and has not missed its last heartbeat."""
        return self.heard_age(engine, now) < engine.live_s

    def missing_lanes(self, now: float) -> list[str]:
        """Configured lanes without a live engine (engines register only after warm-up)."""
        return [lane for lane, peers in self.by_lane.items()
                if not any(self.is_live(e, now) for e in peers)]

    def count(self, lane: str | None, status: int, n: int, nbytes: int = 0) -> LaneStats | None:
        """Count one answered request of ``n`` items (``nbytes`` sent) under its status."""
        if lane is None or lane not in self.stats:
            return None
        stats = self.stats[lane]
        stats.requests[status] = stats.requests.get(status, 0) + 1
        stats.items[status] = stats.items.get(status, 0) + n
        stats.bytes_out += nbytes
        return stats

    def engine_view(self, e: Engine, now: float) -> dict[str, Any]:
        """One engine as the stats show it (see docs/stats.md)."""
        return {
            "id": e.identity.hex(), "alive": self.is_live(e, now), "pid": e.info.get("pid"),
            "fingerprint": e.fingerprint, "dim": e.dim, "model": e.info.get("model"),
            "kinds": sorted(e.kinds), "device": e.info.get("device"),
            "random_weights": bool(e.info.get("random_weights", False)),
            "pretrained": e.info.get("pretrained"), "dtype": e.info.get("dtype"),
            "pipeline": e.info.get("pipeline"),
            "dimensions": announces_dimensions(e.info),
            "prompts": sorted(announced_prompts(e.info)),
            "default_prompt": announced_default_prompt(e.info),
            "batch_invariant": e.info.get("batch_invariant"),
            "batch_invariant_holds": e.info.get("batch_invariant_holds"),
            "warmup_items_per_s": e.info.get("warmup_items_per_s"),
            "credits_total": e.credits_total, "credits_free": e.credits_free,
            "credits_limit": e.credits_limit,
            "adaptive": e.control.view() if e.control is not None else None,
            "sizing": e.info.get("sizing"), "max_batch": e.max_batch,
            "items_in_flight": e.credits_total - e.credits_free,
            "requests_done": e.requests_done, "items_done": e.items_done,
            "batches": e.batches, "batch_items": e.batch_items,
            "mean_batch_size": round(e.batch_items / e.batches, 2) if e.batches else None,
            "heartbeat_age_s": round(self.heard_age(e, now), 3),
            "brokers": announced_brokers(e.info), "serving": e.info.get("serving", 1),
        }

    def lane_view(self, lane: str, now: float) -> dict[str, Any]:
        """One lane's engines, credits, counters and latencies (see docs/stats.md)."""
        peers, st = self.by_lane[lane], self.stats[lane]
        engines = [self.engine_view(e, now) for e in peers]
        return {
            "ready": any(e["alive"] for e in engines),
            "engines": engines,
            "credits_total": sum(e.credits_total for e in peers),
            "credits_free": sum(e.credits_free for e in peers),
            "credits_limit": sum(e.credits_limit for e in peers),
            "latency_target_ms": self.target_ms(lane),
            "requests": {str(k): v for k, v in st.requests.items()},
            "items": {str(k): v for k, v in st.items.items()},
            "items_dispatched": st.items_dispatched,
            "cache_hits": dict(st.cache_hits), "cache_misses": dict(st.cache_misses),
            "cache_errors": dict(st.cache_errors),
            "single_flight_joins": st.single_flight_joins,
            "bytes_in": st.bytes_in, "bytes_out": st.bytes_out,
            "items_per_s": round(self.lane_rate(lane, now), 1),
            "engines_registered": st.engines_registered,
            "engines_lost": st.engines_lost,
            "latency_ms": st.latency_window.quantiles_ms(now),
            "latency_hist": st.latency.snapshot(),
            "reject_ms": st.reject_window.quantiles_ms(now),
            "reject_hist": st.reject.snapshot(),
            "classes": {c: {"admitted": st.admitted_by_class[c],
                            "refused": st.refused_by_class[c]} for c in sorted(p.PRIORITIES)},
            "bulk_reserve": sum(self.reserve(e) for e in peers),
            "retry_lines": {c: line.view() for c, line in
                            zip((p.PRIORITY_INTERACTIVE, p.PRIORITY_BULK), self.lines[lane],
                                strict=True)},
        }

    def lane_info(self, lane: str, now: float, max_items: int) -> dict[str, Any]:
        """What a client needs to size requests for ``lane`` (the ``info`` op, docs/protocol.md).

        ``max_request_items`` is the largest request the lane can take at all: the broker's
        ``max_items`` or the biggest live engine's credits, whichever is smaller (0 while no
        engine is live). ``max_batch`` is the biggest engine batch, so bulk clients can send
        requests that fill a forward pass while the next one waits its turn. ``dimensions``,
        ``prompts`` (names) and ``default_prompt`` say what a request may ask of the model.
        """
        live = [e for e in self.by_lane[lane] if self.is_live(e, now)]
        model = self.models.get(lane)
        biggest = max((e.credits_total for e in live), default=0)
        bulk_biggest = max((e.credits_limit - self.reserve(e) for e in live),
                           default=0)
        return {
            "ready": bool(live),
            "model": live[0].info.get("model") if live else None,
            "fingerprints": dict(model.fingerprints) if model else {},
            "dim": model.dim if model else None,
            "engines": len(live),
            "credits_total": sum(e.credits_total for e in live),
            "credits_free": sum(e.credits_free for e in live),
            "credits_limit": sum(e.credits_limit for e in live),
            "latency_target_ms": self.target_ms(lane),
            "max_request_items": min(max_items, biggest),
            "bulk_max_request_items": min(max_items, bulk_biggest),
            "bulk_credits": sum(e.credits_limit - self.reserve(e) for e in live),
            "max_batch": max((e.max_batch for e in live), default=0),
            "dimensions": model.dimensions if model else False,
            "prompts": sorted(model.prompts) if model else [],
            "default_prompt": model.default_prompt if model else None,
        }

    def target_ms(self, lane: str) -> float | None:
        """The lane's latency target in ms (adaptive credits), None for fixed credits."""
        target = self.latency_targets.get(lane)
        return None if target is None else round(target * 1000, 1)

    def snapshot(self, now: float) -> dict[str, Any]:
        """A msgpack-able view of lanes, engines and counters for the stats."""
        return {"lanes": {lane: self.lane_view(lane, now) for lane in self.lanes},
                "in_flight": len(self.inflight), "late_replies": self.late_replies,
                "recredits": self.recredits}

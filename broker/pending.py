"""Client requests being assembled from cache hits, shared flights and new engine requests.

A client request's items get their vectors from three places: the cache (at once), a flight
already on its way to an engine for the same key (single-flight: the model runs once), or a
new engine request for the misses that are left (duplicates within the request sent once).
This table tracks which waiter needs which row of which flight, and each request's deadline.
No sockets, no cache I/O: the broker loop feeds it and sends what it returns.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from zembed import protocol as p

#: A flight this far from its deadline is safe to join even for a request with a later one.
JOIN_MARGIN_S = 1.0


@dataclass(slots=True, eq=False)
class ClientRequest:
    """One validated embed request and the rows assembled for it so far (BF16 words)."""

    client: bytes
    rid: int
    lane: str
    kind: str
    normalize: bool
    dtype: str
    input_type: str | None
    items: list[Any]
    deadline: float
    started: float
    #: Matryoshka truncation asked for; None for the model's full dim (also when asked for it).
    dimensions: int | None = None
    priority: str = p.PRIORITY_INTERACTIVE  # interactive, or bulk (kept off the reserve)
    ticket: int | None = None  # 0: wants a ticket if refused; else the one a 429 gave it
    keys: list[bytes | None] = field(default_factory=list)
    dim: int = 0  # the width of its rows: ``dimensions`` or the lane's dim
    rows: bytearray = field(default_factory=bytearray)
    missing: int = 0
    cached: list[int] = field(default_factory=list)  # item indices served from the cache
    joined: int = 0
    item_errors: list[list[Any]] = field(default_factory=list)
    answered: bool = False

    @property
    def n(self) -> int:
        return len(self.items)

    def fill(self, i: int, words: bytes | memoryview) -> None:
        """Set row ``i`` (``dim`` BF16 words) and count it done."""
        row = 2 * self.dim
        self.rows[i * row:(i + 1) * row] = words
        self.missing -= 1


@dataclass(slots=True, eq=False)
class Flight:
    """One engine request: per position, its cache key and the (request, item) pairs waiting."""

    token: int
    kind: str
    deadline: float
    keys: list[bytes | None]
    waiters: list[list[tuple[ClientRequest, int]]]


@dataclass(slots=True)
class Plan:
    """What :meth:`PendingTable.plan` left to do: items to send, duplicates riding along."""

    send: list[int]
    duplicates: list[tuple[int, int]]  # (item index, index of the identical item being sent)


class PendingTable:
    """Requests waiting for rows, flights by token and by key, and request deadlines."""

    def __init__(self) -> None:
        self.flights: dict[int, Flight] = {}
        self.by_key: dict[bytes, tuple[Flight, int]] = {}
        self._deadlines: list[tuple[float, int, ClientRequest]] = []
        self._seq = itertools.count()

    def plan(self, req: ClientRequest, hits: list[bytes | None], dim: int,
             now: float) -> Plan:
        """Fill cache hits, join flights in the air; return the item indices still to send.

        ``dim`` is the width of the request's rows (its ``dimensions``, or the lane's dim).
        Flights are joined by cache key, which holds the width, so rows always fit.

        Items with the same key as an earlier one in the request are not sent twice: they wait
        on the first one's row. ``hits[i]`` are the BF16 words of item ``i`` or None. A flight is
        joined only if it will not be dropped as expired while the joiner still has time: its
        deadline is no earlier than the joiner's, or at least ``JOIN_MARGIN_S`` away.
        """
        join_after = min(req.deadline, now + JOIN_MARGIN_S)
        req.dim = dim
        req.rows = bytearray(2 * dim * req.n)
        req.missing = req.n
        plan = Plan([], [])
        first: dict[bytes, int] = {}
        for i, (key, words) in enumerate(zip(req.keys, hits, strict=True)):
            if words is not None:
                req.fill(i, words)
                req.cached.append(i)
                continue
            if key is not None:
                flight = self.by_key.get(key)
                if flight is not None and flight[0].deadline >= join_after:
                    flight[0].waiters[flight[1]].append((req, i))
                    req.joined += 1
                    continue
                if key in first:
                    plan.duplicates.append((i, first[key]))
                    continue
                first[key] = i
            plan.send.append(i)
        return plan

    def launch(self, token: int, req: ClientRequest, plan: Plan) -> Flight:
        """Record the engine request carrying ``plan.send`` for ``req``."""
        flight = Flight(token, req.kind, req.deadline, [req.keys[i] for i in plan.send],
                        [[(req, i)] for i in plan.send])
        position = {i: pos for pos, i in enumerate(plan.send)}
        for i, original in plan.duplicates:  # duplicates within the request ride along
            flight.waiters[position[original]].append((req, i))
        for pos, key in enumerate(flight.keys):
            if key is not None:
                self.by_key[key] = (flight, pos)
        self.flights[token] = flight
        return flight

    def track(self, req: ClientRequest) -> None:
        """Watch ``req``'s deadline until it is answered."""
        heapq.heappush(self._deadlines, (req.deadline, next(self._seq), req))

    def land(self, token: int, rows: memoryview, item_errors: dict[int, tuple[int, str]]
             ) -> tuple[list[ClientRequest], list[tuple[bytes, bytes]]]:
        """A flight's rows arrived: fill waiters; return (requests now complete, rows to cache).

        ``rows`` holds one ``dim``-row of BF16 words per position of the flight.
        """
        flight = self._pop(token)
        done: list[ClientRequest] = []
        fresh: list[tuple[bytes, bytes]] = []
        if flight is None:
            return done, fresh
        for pos, waiters in enumerate(flight.waiters):
            error = item_errors.get(pos)
            for req, i in waiters:
                if req.answered:
                    continue
                row = 2 * req.dim
                words = rows[pos * row:(pos + 1) * row]
                if error is not None:
                    req.item_errors.append([i, error[0], error[1]])
                req.fill(i, words)
                if req.missing == 0:
                    done.append(req)
            key = flight.keys[pos]
            if error is None and key is not None and waiters:
                row = 2 * waiters[0][0].dim
                fresh.append((key, bytes(rows[pos * row:(pos + 1) * row])))
        return done, fresh

    def fail(self, token: int) -> list[ClientRequest]:
        """A flight failed or its engine died: the unanswered requests waiting on it."""
        flight = self._pop(token)
        if flight is None:
            return []
        out: dict[int, ClientRequest] = {}
        for waiters in flight.waiters:
            for req, _ in waiters:
                if not req.answered:
                    out[id(req)] = req
        return list(out.values())

    def expire(self, now: float) -> list[ClientRequest]:
        """Unanswered requests past their deadline (their flights go on, holding credits)."""
        expired: list[ClientRequest] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            req = heapq.heappop(self._deadlines)[2]
            if not req.answered:
                expired.append(req)
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline being watched, if any."""
        return self._deadlines[0][0] if self._deadlines else None

    def _pop(self, token: int) -> Flight | None:
        flight = self.flights.pop(token, None)
        if flight is not None:
            for key in flight.keys:
                if key is not None and self.by_key.get(key, (None,))[0] is flight:
                    del self.by_key[key]
        return flight


def item_errors_by_position(raw: Any) -> dict[int, tuple[int, str]]:
    """Engine ``item_errors`` ([[pos, status, message], ...]) as a dict; junk is ignored."""
    out: dict[int, tuple[int, str]] = {}
    if isinstance(raw, list):
        for entry in raw:
            if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int):
                status = entry[1] if entry[1] in p.STATUSES else p.ENGINE_ERROR
                out[entry[0]] = (status, str(entry[2]))
    return out

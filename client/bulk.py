"""Bulk embedding without I/O: what ``Client.embed_many`` and ``AsyncClient.embed_many`` share.

Indexing a corpus means: take inputs from any iterable (a list, or a generator reading a
10-million-line file), cut them into requests the broker can take (its ``info`` op says how
big), keep enough requests in flight to keep every engine of the lane busy and no more,
resend what was refused or lost, and hand vectors back in input order. This module holds
that plan as a plain object (:class:`BulkPlan`): the sync and asyncio clients only send what
it says, and tell it what came back, so the logic is tested without sockets.

Retry rules (one policy, :func:`zembed.client.codec.retry_delay`, with jitter):

- 429: wait the broker's ``retry_after`` and send again, for as long as it takes. The broker
  is alive and says when there will be room; a bulk run only slows down.
- 503 (engine lost or none yet, broker unreachable) and 504: exponential backoff, for at most
  ``retry_for_s`` since that request last made progress; then the run fails.
- 413: the lane's limits changed (an engine with fewer credits, say): the request is split in
  two and the sizes read again; a single item that is too large is an item error.
- An input the broker would refuse (not a string for a text kind, too many bytes, an
  unreadable image file) is an item error before anything is sent. Item errors never stop the
  run: their rows are zeros, and they are reported with their input index.
- Anything else (400 for the request as a whole, 404, 500) is raised: it will not get better.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from zembed import protocol as p
from zembed.client.codec import (
    EmbedResult,
    Vectors,
    check_dimensions,
    kept_ticket,
    retry_delay,
)
from zembed.client.images import image_item
from zembed.errors import BadRequest, TooLarge, UnknownLane, ZembedError

#: The lane that serves each kind.
KIND_LANES = {p.KIND_TEXT: p.LANE_TEXT, p.KIND_CLIP_TEXT: p.LANE_IMAGE,
              p.KIND_IMAGE: p.LANE_IMAGE}
#: msgpack bytes around each item (type and length prefix, at most) and around the list.
ITEM_OVERHEAD_BYTES = 5
#: Requests sized while the lane has no live engine (the broker cannot say yet).
PROVISIONAL_ITEMS = 8
#: At most this many pieces wait, finished, for an earlier one (memory bound on reordering),
#: as a multiple of the requests in flight.
REORDER_FACTOR = 4


class EmbedChunk(NamedTuple):
    """Vectors of consecutive inputs ``offset .. offset + len(vectors) - 1``.

    ``item_errors`` maps an input's index (in the whole run) to (status, message): its row is
    zeros. ``cached_items`` lists the indices served from the cache.
    """

    offset: int
    vectors: Vectors
    item_errors: dict[int, tuple[int, str]]
    cached_items: list[int]


@dataclass(frozen=True, slots=True)
class Sizing:
    """How big each request is and how many are in flight, from the broker's ``info``."""

    items: int
    body_bytes: int
    item_bytes: int
    in_flight: int
    dim: int | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any], kind: str, *, items: int | None = None,
                  in_flight: int | None = None, lane_name: str | None = None,
                  bulk: bool = True, brokers: int = 1) -> Sizing:
        """Requests that fill a forward pass, two per engine so the next one always waits.

        ``items`` and ``in_flight`` override what the broker suggests (``items`` is still
        capped by what the lane can take). ``lane_name``: the lane, when not the kind's
        usual one (a broker's own lanes, ``--lanes``). ``bulk``: sized for priority bulk,
        within the credits the broker lets bulk work take (``bulk_max_request_items``,
        ``bulk_credits``; brokers without them: all). ``brokers``: how many brokers the
        client spreads over; ``info`` is one broker's, and each has its own share of the
        engines' credits, so the default in-flight count is that many times one broker's.
        """
        if kind not in KIND_LANES:
            raise BadRequest(f"kind must be one of {sorted(KIND_LANES)}, not {kind!r}")
        limits, lanes = info.get("limits", {}), info.get("lanes", {})
        lane = lanes.get(lane_name or KIND_LANES[kind])
        if lane is None:
            raise UnknownLane(f"the broker serves no lane for kind {kind!r} ({sorted(lanes)})")
        max_items = int(limits.get("max_items", PROVISIONAL_ITEMS))
        largest = int(lane.get("max_request_items") or 0)
        # Adaptive credits: the broker's current limits, not what the engines announced.
        credits = int(lane.get("credits_limit") or lane.get("credits_total") or 0)
        if bulk and "bulk_max_request_items" in lane:
            largest = int(lane.get("bulk_max_request_items") or 0)
            credits = int(lane.get("bulk_credits") or 0)
        if largest <= 0:  # no live engine: small requests until the broker can tell
            size = min(items or PROVISIONAL_ITEMS, max_items)
            return cls(size, _body_limit(limits), _item_limit(limits, kind), in_flight or 1,
                       lane.get("dim"))
        # The engine's batch, halved until two requests fit one engine: requests that pair up
        # into full forward passes (a bulk share of 48 gets 16s, three in flight, not 24s
        # that leave every batch of 32 a quarter empty).
        size = int(lane.get("max_batch") or largest)
        while size > 1 and 2 * size > largest:
            size = (size + 1) // 2
        size = min(items or size, largest)
        flight = in_flight or max(1, credits // size) * max(1, brokers)
        return cls(size, _body_limit(limits), _item_limit(limits, kind), flight, lane.get("dim"))


def _body_limit(limits: dict[str, Any]) -> int:
    return int(limits.get("max_request_bytes", 64 << 20))


def _item_limit(limits: dict[str, Any], kind: str) -> int:
    key = "max_image_bytes" if kind == p.KIND_IMAGE else "max_item_bytes"
    return int(limits.get(key, 65_536))


@dataclass(slots=True)
class Piece:
    """Inputs ``offset .. offset + size - 1``, of which ``wire`` (at ``where``) are sent."""

    offset: int
    size: int
    wire: list[Any]
    where: list[int]
    errors: dict[int, tuple[int, str]] = field(default_factory=dict)
    attempt: int = 0
    #: 0: a 429 gives this piece a ticket; then that ticket, which keeps its place in the
    #: broker's line of refused requests; None: no ticket (docs/protocol.md).
    ticket: int | None = 0
    not_before: float = 0.0
    failing_since: float | None = None
    result: EmbedResult | None = None


def wire_item(item: Any, kind: str, item_bytes: int,
              convert: Callable[[Any], Any] | None) -> tuple[Any, tuple[int, str] | None]:
    """(what to send, None) or (None, (status, why)) for an input the broker would refuse."""
    if convert is not None:
        try:
            item = convert(item)
        except (OSError, ZembedError, ValueError, TypeError) as exc:
            return None, (p.BAD_REQUEST, f"{type(exc).__name__}: {exc}")
    if kind in p.TEXT_KINDS:
        if not isinstance(item, str):
            return None, (p.BAD_REQUEST, f"a {kind} input must be str, got {type(item).__name__}")
        size = len(item) if len(item) * 4 <= item_bytes else len(item.encode("utf-8",
                                                                              "surrogatepass"))
    else:
        size = len(item)
    if size > item_bytes:
        return None, (p.TOO_LARGE, f"{size} bytes, at most {item_bytes} allowed")
    return item, None


class BulkPlan:
    """The state of one bulk run: what to send next, what to retry when, what is done.

    :param items: the inputs, read lazily (an iterator is consumed once, as far as needed).
    :param kind: ``text``, ``clip-text`` or ``image``.
    :param sizing: request size and requests in flight (:meth:`Sizing.from_info`).
    :param convert: turns an input into a wire item; may raise. By default, for images,
        :func:`~zembed.client.images.image_item` (paths read, PIL images encoded here).
    :param retry_for_s: how long a request may keep failing with 503/504 before the run fails.
    :param backoff_s: first backoff step for 503/504.
    :param dtype: ``f32`` or ``bf16``, for the zero rows of failed items.
    :param dimensions: the width asked for (Matryoshka truncation), if any: the rows are that
        wide, not the lane's ``dim`` from ``info``.
    :param refuse_unadmitted: raise a 429 that comes while nothing of the run is admitted (no
        request answered with vectors, none other in flight) instead of waiting it out: the
        run is refused as a whole, at once, as a single request would be. The HTTP gateway
        splits one large request this way: a full lane turns it away; once it is in, it
        finishes.
    """

    def __init__(self, items: Iterable[Any], kind: str, sizing: Sizing, *,
                 convert: Callable[[Any], Any] | None = None, retry_for_s: float = 300.0,
                 backoff_s: float = 0.05, dtype: str = p.DTYPE_F32,
                 dimensions: int | None = None, refuse_unadmitted: bool = False,
                 rand: Callable[[], float] = random.random) -> None:
        self.kind = kind
        self.sizing = sizing
        self.convert = convert or (image_item if kind == p.KIND_IMAGE else None)
        self.retry_for_s = retry_for_s
        self.backoff_s = backoff_s
        self.rand = rand
        self.refuse_unadmitted = refuse_unadmitted
        self._admitted = False  # a request of the run was answered with vectors
        self.dtype = np.dtype("<f4") if dtype == p.DTYPE_F32 else np.dtype("<u2")
        self.dim = sizing.dim if dimensions is None else check_dimensions(dimensions)
        self._inputs = iter(items)
        self._exhausted = False
        self._read = 0  # inputs taken from the iterator so far
        self._emitted = 0  # inputs handed back so far
        self._waiting: deque[Piece] = deque()  # to send (again) at their not_before
        self._in_flight = 0
        self._finished: dict[int, Piece] = {}  # by offset, until every earlier one is done
        #: The broker's sizes should be read again (after a 413, or while provisional).
        self.wants_info = False
        self.retries = 0  # requests sent again (observability)
        self.items_failed = 0

    # -- what to send --------------------------------------------------------------------

    def take(self, now: float) -> list[Piece]:
        """Pieces to send now: retries that are due, then new ones while there is room."""
        out: list[Piece] = []
        for _ in range(len(self._waiting)):
            if self._in_flight + len(out) >= self.sizing.in_flight:
                break
            piece = self._waiting[0]
            if piece.not_before > now:
                self._waiting.rotate(-1)
                continue
            out.append(self._waiting.popleft())
        while (self._in_flight + len(out) < self.sizing.in_flight and not self._exhausted
               and len(self._finished) < REORDER_FACTOR * self.sizing.in_flight):
            new = self._next_piece()
            if new is None:
                break
            if new.wire:
                out.append(new)
            else:  # nothing to send: every input of it failed here
                self._finish(new)
        self._in_flight += len(out)
        return out

    def _next_piece(self) -> Piece | None:
        """The next inputs, up to the request size in items and bytes."""
        size = self.sizing
        piece = Piece(self._read, 0, [], [])
        if self.refuse_unadmitted and not self._admitted:
            piece.ticket = None  # its 429 may end the request: a ticket would only hold room
        body = ITEM_OVERHEAD_BYTES
        while piece.size < size.items:
            try:
                item = next(self._inputs)
            except StopIteration:
                self._exhausted = True
                break
            wire, error = wire_item(item, self.kind, size.item_bytes, self.convert)
            if error is not None:
                piece.errors[piece.size] = error
            else:
                cost = len(wire) + ITEM_OVERHEAD_BYTES
                if piece.wire and body + cost > size.body_bytes:
                    self._inputs = itertools.chain([item], self._inputs)
                    break
                body += cost
                piece.wire.append(wire)
                piece.where.append(piece.size)
            piece.size += 1
        self._read += piece.size
        return piece if piece.size else None

    def wake_at(self) -> float | None:
        """When the earliest waiting retry is due (None: nothing waits, or no room to send it:
        then only a reply can make progress, and the caller waits for one)."""
        if self._in_flight >= self.sizing.in_flight:
            return None
        return min((piece.not_before for piece in self._waiting), default=None)

    @property
    def done(self) -> bool:
        """Every input was read, answered and handed back."""
        return (self._exhausted and not self._waiting and not self._in_flight
                and not self._finished)

    @property
    def _drained(self) -> bool:
        """Nothing more can arrive (so a dimension no reply gave will never be known)."""
        return self._exhausted and not self._waiting and not self._in_flight

    def resize(self, sizing: Sizing) -> None:
        """New sizes from the broker (engines came or went); pieces already cut keep theirs."""
        self.sizing = sizing
        self.dim = self.dim or sizing.dim
        self.wants_info = False

    # -- what came back ------------------------------------------------------------------

    def succeeded(self, piece: Piece, result: EmbedResult) -> None:
        """A piece's request was answered with vectors."""
        self._in_flight -= 1
        self._admitted = True
        piece.result = result
        self.dim = self.dim or int(result.vectors.shape[1])
        self._finish(piece)

    def failed(self, piece: Piece, exc: ZembedError, now: float) -> None:
        """A piece's request failed: schedule it again, split it, or raise ``exc``."""
        self._in_flight -= 1
        if isinstance(exc, TooLarge):
            self.wants_info = True
            self._split(piece, exc)
            return
        # A 429 waits what the broker estimates (its backoff does not grow: the lane is alive
        # and busy, and a bulk run that waited longer than asked would only lose its turn).
        overloaded = exc.status == p.OVERLOADED
        if (overloaded and self.refuse_unadmitted and not self._admitted
                and not self._in_flight):
            raise exc
        piece.ticket = kept_ticket(exc, piece.ticket)
        delay = retry_delay(exc, 0 if overloaded else piece.attempt, self.backoff_s,
                            deadline=True, rand=self.rand)
        if delay is None:
            raise exc
        if not overloaded:
            piece.attempt += 1
            piece.failing_since = piece.failing_since or now
            if now - piece.failing_since > self.retry_for_s:
                raise type(exc)(f"{exc.message} (inputs {piece.offset}..."
                                f"{piece.offset + piece.size - 1} still failing after "
                                f"{self.retry_for_s:g} s of retries)", status=exc.status)
            if self.sizing.items <= PROVISIONAL_ITEMS:
                self.wants_info = True  # perhaps sized before an engine was there
        piece.not_before = now + delay
        self.retries += 1
        self._waiting.append(piece)

    def _split(self, piece: Piece, exc: TooLarge) -> None:
        """Send a refused piece as two halves; a single input that is too large fails."""
        if len(piece.wire) == 1:
            piece.errors[piece.where[0]] = (exc.status, exc.message)
            piece.wire, piece.where = [], []
            self._finish(piece)
            return
        half = len(piece.wire) // 2
        cut = piece.where[half]  # inputs before ``cut`` go in the first half
        first = Piece(piece.offset, cut, piece.wire[:half], piece.where[:half],
                      {i: e for i, e in piece.errors.items() if i < cut})
        second = Piece(piece.offset + cut, piece.size - cut, piece.wire[half:],
                       [w - cut for w in piece.where[half:]],
                       {i - cut: e for i, e in piece.errors.items() if i >= cut})
        self._waiting.extendleft([second, first])

    def _finish(self, piece: Piece) -> None:
        self._finished[piece.offset] = piece

    # -- what to hand back ---------------------------------------------------------------

    def ready(self) -> Iterator[EmbedChunk]:
        """Finished pieces in input order, as soon as every earlier one is finished."""
        while self._emitted in self._finished and (self.dim is not None or self._drained):
            piece = self._finished.pop(self._emitted)
            self._emitted += piece.size
            yield self._chunk(piece)

    def _chunk(self, piece: Piece) -> EmbedChunk:
        dim = self.dim or 0
        errors = {piece.offset + i: e for i, e in piece.errors.items()}
        result = piece.result
        if result is None:  # nothing was sent: every input failed here
            vectors = np.zeros((piece.size, dim), self.dtype)
            cached: list[int] = []
        else:
            if len(piece.wire) == piece.size:
                vectors = result.vectors
            else:
                vectors = np.zeros((piece.size, result.vectors.shape[1]), result.vectors.dtype)
                vectors[piece.where] = result.vectors
            errors.update({piece.offset + piece.where[i]: e
                           for i, e in result.item_errors.items()})
            cached = [piece.offset + piece.where[i] for i in result.cached_items]
        self.items_failed += len(errors)
        return EmbedChunk(piece.offset, vectors, errors, cached)


def total_of(items: Iterable[Any]) -> int | None:
    """How many inputs, when the iterable knows (for progress bars), else None."""
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def seconds_until(when: float | None, now: float, cap: float) -> float:
    """Seconds to wait for ``when`` (at most ``cap``; ``cap`` when nothing is due)."""
    return cap if when is None else max(0.0, min(cap, when - now))


def ceil_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up (a poll that wakes early only spins)."""
    return max(0, math.ceil(seconds * 1000))

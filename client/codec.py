"""Request encoding and reply decoding shared by the sync and asyncio clients."""

from __future__ import annotations

import itertools
import math
import operator
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from zembed import protocol as p
from zembed.errors import BadRequest, ZembedError, error_for
from zembed.messages import packb

_ids = itertools.count(1)

#: What the embed calls return: float32 ``(n, dim)``, or uint16 BF16 words for ``dtype="bf16"``.
Vectors = npt.NDArray[Any]


def next_id() -> int:
    """Request ids are unique per process, so several clients may share one log."""
    return next(_ids)


@dataclass(slots=True)
class EmbedResult:
    """Vectors of one request, with what the broker said about them.

    ``vectors`` is float32 ``(n, dim)``, or raw BF16 words (uint16) when ``dtype="bf16"`` was
    asked for (widen with :func:`zembed.cache.bf16.from_bf16`). ``cached`` counts items served
    from the cache and ``cached_items`` lists their indices; ``item_errors`` maps item index to
    (status, message) for failed items.
    """

    vectors: Vectors
    cached: int = 0
    item_errors: dict[int, tuple[int, str]] = field(default_factory=dict)
    cached_items: list[int] = field(default_factory=list)


def embed_frames(
    rid: int, lane: str, kind: str, items: Sequence[Any], *, normalize: bool, dtype: str,
    timeout_s: float, input_type: str | None, dimensions: int | None = None,
    priority: str | None = None, ticket: int | None = None,
) -> list[bytes]:
    """Frames of an embed request (the DEALER adds nothing; the broker's ROUTER adds identity).

    ``dimensions`` (Matryoshka truncation) goes in the header only when given: the broker
    judges it against the lane's model, and an absent field is what every broker accepts.
    """
    if dtype not in p.DTYPES:
        raise BadRequest(f"dtype must be one of {sorted(p.DTYPES)}")
    if isinstance(items, (str, bytes)):
        raise BadRequest("items must be a sequence of inputs, not a single str/bytes")
    header: dict[str, Any] = {
        "op": p.OP_EMBED, "id": rid, "lane": lane, "kind": kind, "normalize": normalize,
        "dtype": dtype, "deadline_ms": broker_deadline_ms(timeout_s), "n": len(items),
    }
    if input_type is not None:
        header["input_type"] = input_type
    if dimensions is not None:
        header["dimensions"] = check_dimensions(dimensions)
    if priority is not None:
        if priority not in p.PRIORITIES:
            raise BadRequest(f"priority must be one of {sorted(p.PRIORITIES)}, got {priority!r}")
        header["priority"] = priority
    if ticket is not None:
        header["ticket"] = ticket  # 0: refuse me with a ticket (I retry); else the 429's
    return [p.CLIENT_PROTO, packb(header), packb(list(items))]


def check_dimensions(dimensions: Any) -> int:
    """``dimensions`` as a plain int (numpy integers too), or BadRequest before anything is
    sent: msgpack cannot carry a numpy int, and a bool or a float is never a width."""
    try:
        value = operator.index(dimensions) if not isinstance(dimensions, bool) else 0
    except TypeError:
        value = 0
    if value < 1:
        raise BadRequest(f"dimensions must be a positive int, got {dimensions!r}")
    return value


#: The broker's deadline is this much shorter than the caller's timeout (at most 10 % of it),
#: so the broker's 504, which says where the time went, arrives before the client gives up.
DEADLINE_MARGIN_S = 0.05


def broker_deadline_ms(timeout_s: float) -> int:
    """``deadline_ms`` to send for a caller's remaining ``timeout_s``."""
    margin = min(DEADLINE_MARGIN_S, timeout_s / 10)
    return max(1, math.floor((timeout_s - margin) * 1000))


def op_frames(rid: int, op: str) -> list[bytes]:
    """Frames of a management request (ping, health, ready, stats, info)."""
    return [p.CLIENT_PROTO, packb({"op": op, "id": rid}), b""]


def reply_id(frames: list[bytes]) -> tuple[int | None, dict[str, Any]]:
    """(request id, header) of a reply, or (None, {}) for something unreadable."""
    if len(frames) < 2 or frames[0] != p.CLIENT_PROTO:
        return None, {}
    try:
        header = msgpack.unpackb(frames[1], raw=False)
    except Exception:
        return None, {}
    if not isinstance(header, dict) or not isinstance(header.get("status"), int):
        # Every reply has a status; without one it is not a reply. (While a broker stays down,
        # a reconnect was seen to come up briefly on its old port; if that was the socket
        # meeting itself, TCP's simultaneous open, our own request would come back.)
        return None, {}
    rid = header.get("id")
    return (rid if isinstance(rid, int) else None), header


def decode_embed(header: dict[str, Any], body: bytes) -> EmbedResult:
    """Vectors from a 200 reply, or raise the typed error of its status."""
    status = header.get("status")
    if status != p.OK:
        raise error_for(int(status or p.ENGINE_ERROR), str(header.get("error", "")),
                        header.get("retry_after_ms"), header.get("ticket"))
    rows, dim = header["shape"]
    dtype = np.dtype("<f4") if header["dtype"] == p.DTYPE_F32 else np.dtype("<u2")
    # A copy: frombuffer over the received bytes is read-only, and callers normalise, stack
    # or write into their vectors (the copy is small beside the network transfer).
    vectors = np.frombuffer(body, dtype=dtype).reshape(rows, dim).copy()
    errors = {int(i): (int(s), str(m)) for i, s, m in header.get("item_errors") or []}
    return EmbedResult(vectors, int(header.get("cached", 0)), errors,
                       [int(i) for i in header.get("cached_idx") or []])


def decode_op(header: dict[str, Any], body: bytes, *, raise_on_error: bool) -> dict[str, Any]:
    """The map a management op answered; raises on a non-200 status when asked to."""
    data = msgpack.unpackb(body, raw=False) if body else {}
    data = data if isinstance(data, dict) else {}
    status = header.get("status", p.ENGINE_ERROR)
    data["status_code"] = status
    if status != p.OK and raise_on_error:
        raise error_for(int(status), str(header.get("error", "")))
    if "error" in header:
        data["error"] = header["error"]
    return data


def first_ticket(retries: int | None) -> int | None:
    """The ``ticket`` of a first attempt: 0 (a refusal gives a ticket that keeps the request's
    place for its retry) when the client retries 429s, else none (docs/protocol.md)."""
    return None if retries == 0 else 0


def kept_ticket(exc: ZembedError, ticket: int | None) -> int | None:
    """The ticket a retry sends: the one a 429 gave, else the one it had."""
    given = getattr(exc, "ticket", None)
    return given if given is not None else ticket


#: No retry waits longer than this (exponential backoff stops growing here), seconds.
MAX_RETRY_DELAY_S = 5.0


def retry_delay(exc: ZembedError, attempt: int, backoff_s: float, *, deadline: bool = False,
                rand: Callable[[], float] = random.random) -> float | None:
    """Seconds to wait before retrying after ``exc``, or None if it is not worth retrying.

    429 honours the broker's ``retry_after``; 503 (no engine, engine lost, broker unreachable)
    backs off exponentially from ``backoff_s``, as does 504 when ``deadline`` is set (bulk work
    retries a request that timed out; a single call's deadline is the caller's). Everything
    else is the caller's problem, not a transient one. Each delay is stretched by a random 0 to
    50 % (``rand`` in [0, 1)), so clients refused in the same turn do not all come back in the
    same turn ("equal jitter": never shorter than the broker's estimate, spread over half of it
    again). Backoff stops growing at ``MAX_RETRY_DELAY_S``.
    """
    growth = backoff_s * 2.0 ** min(attempt, 30)
    if exc.status == p.OVERLOADED:
        base = max(float(getattr(exc, "retry_after", 0.0)), growth / 4)
    elif exc.status == p.UNAVAILABLE or (deadline and exc.status == p.DEADLINE_EXCEEDED):
        base = growth
    else:
        return None
    return min(base, MAX_RETRY_DELAY_S) * (1.0 + rand() / 2)

"""Typed errors of zembed, each mapped to its wire status in one table.

Clients raise these from reply statuses; the broker raises ``BadRequest``/``TooLarge`` while
validating and turns them back into statuses. One base class so callers can catch everything
zembed raises with ``except ZembedError``.
"""

from __future__ import annotations

from typing import Any

from zembed import protocol as p


class ZembedError(Exception):
    """Base of every error zembed raises; ``status`` is the wire status it stands for."""

    status: int = p.ENGINE_ERROR

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status})"


class BadRequest(ZembedError):
    """The request was malformed (frames, header, body or item types): fix the caller."""

    status = p.BAD_REQUEST


class UnknownLane(ZembedError):
    """The broker serves no lane of that name."""

    status = p.UNKNOWN_LANE


class TooLarge(ZembedError):
    """Too many items, or an item or request over the configured byte limits: split it."""

    status = p.TOO_LARGE


class Overloaded(ZembedError):
    """The lane had no credits for the request; retrying after ``retry_after`` seconds is sane."""

    status = p.OVERLOADED

    def __init__(self, message: str, *, retry_after: float = 0.0,
                 ticket: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: The broker's ticket for this refusal: sent with the retry, it keeps the request's
        #: place among those refused before it (docs/protocol.md).
        self.ticket = ticket

    def __repr__(self) -> str:
        return f"Overloaded({self.message!r}, retry_after={self.retry_after})"


class EngineError(ZembedError):
    """The engine failed while computing the request (a bug or a resource problem there)."""

    status = p.ENGINE_ERROR


class EngineUnavailable(ZembedError):
    """No live engine serves the lane, or the engine was lost with the request in flight.

    Embedding is a pure function, so retrying is safe.
    """

    status = p.UNAVAILABLE


class DeadlineExceeded(ZembedError):
    """The request's deadline passed before its answer was ready (at the broker or client)."""

    status = p.DEADLINE_EXCEEDED


class ConnectionClosed(ZembedError):
    """The client was used after ``close()``."""

    status = p.UNAVAILABLE


#: Wire status -> exception class, used by clients to raise the right type.
ERROR_BY_STATUS: dict[int, type[ZembedError]] = {
    p.BAD_REQUEST: BadRequest,
    p.UNKNOWN_LANE: UnknownLane,
    p.TOO_LARGE: TooLarge,
    p.OVERLOADED: Overloaded,
    p.ENGINE_ERROR: EngineError,
    p.UNAVAILABLE: EngineUnavailable,
    p.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_for(status: int, message: str, retry_after_ms: int | None = None,
              ticket: Any = None) -> ZembedError:
    """Build the typed error for a non-200 reply status."""
    if status == p.OVERLOADED:
        valid = isinstance(ticket, int) and not isinstance(ticket, bool) and ticket >= 0
        return Overloaded(message, retry_after=(retry_after_ms or 0) / 1000.0,
                          ticket=ticket if valid else None)
    cls = ERROR_BY_STATUS.get(status, ZembedError)
    return cls(message, status=status)

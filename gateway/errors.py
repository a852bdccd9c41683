"""HTTP answers for errors: one mapping from zembed's statuses, in two dialects.

OpenAI-style routes answer ``{"error": {"message", "type", "param", "code"}}`` (what the
``openai`` SDKs parse into their exception's ``message``/``code``); TEI's ``/embed`` answers
``{"error", "error_type"}`` (what TEI clients read). Both carry the same HTTP status, so a
client that only looks at the status behaves the same on either route.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import orjson

from zembed import protocol as p
from zembed.errors import Overloaded, ZembedError

#: HTTP status -> OpenAI error ``type`` (the values OpenAI's own API uses where it has one).
OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
    429: "rate_limit_exceeded", 500: "server_error", 503: "service_unavailable",
    504: "timeout",
}
#: HTTP status -> TEI ``error_type``.
TEI_TYPES = {400: "Validation", 401: "Unauthorized", 404: "Validation", 405: "Validation",
             413: "Validation", 422: "Validation", 429: "Overloaded", 500: "Backend",
             503: "Unhealthy", 504: "Backend"}

#: zembed status -> (HTTP status, OpenAI ``code``).
STATUS_CODES = {
    p.BAD_REQUEST: (400, "invalid_input"), p.UNKNOWN_LANE: (404, "model_not_found"),
    p.TOO_LARGE: (413, "input_too_large"), p.OVERLOADED: (429, "overloaded"),
    p.ENGINE_ERROR: (500, "engine_error"), p.UNAVAILABLE: (503, "unavailable"),
    p.DEADLINE_EXCEEDED: (504, "timeout"),
}


@dataclass(slots=True)
class HttpError(Exception):
    """An error answer: status, a sentence for the user, a machine-readable code.

    ``param`` names the request field at fault (OpenAI's ``param``); ``retry_after_s`` adds
    ``Retry-After`` (whole seconds, rounded up, as HTTP defines it) and ``retry-after-ms`` (the
    exact estimate; the ``openai`` SDKs prefer it) to a 429 or 503.
    """

    status: int
    message: str
    code: str
    param: str | None = None
    retry_after_s: float | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def retry_headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after_s is None:
            return []
        ms = max(0, math.ceil(self.retry_after_s * 1000))
        return [(b"retry-after", str(max(1, math.ceil(ms / 1000))).encode()),
                (b"retry-after-ms", str(ms).encode())]

    def openai_body(self) -> bytes:
        return orjson.dumps({"error": {
            "message": self.message, "type": OPENAI_TYPES.get(self.status, "server_error"),
            "param": self.param, "code": self.code}})

    def tei_body(self) -> bytes:
        return orjson.dumps({"error": self.message,
                             "error_type": TEI_TYPES.get(self.status, "Backend")})


def from_zembed(exc: ZembedError, *, where: str = "") -> HttpError:
    """The HTTP answer for an error the broker (or the client library) raised."""
    status, code = STATUS_CODES.get(exc.status, (500, "engine_error"))
    retry = exc.retry_after if isinstance(exc, Overloaded) else None
    if status == 503 and retry is None:
        retry = 1.0  # a broker or engine coming back: worth one more try soon
    message = f"{where}{exc.message}" if where else exc.message
    return HttpError(status, message, code, "input" if status in (400, 413) else None, retry)


def unreachable(endpoint: str) -> HttpError:
    """The 503 for a broker this gateway has no connection to (retry in a second)."""
    return HttpError(503, f"the broker at {endpoint} is not reachable", "broker_unreachable",
                     None, 1.0)


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> HttpError:
    """A 400 for the request as sent (fields, types, JSON)."""
    return HttpError(400, message, code, param)

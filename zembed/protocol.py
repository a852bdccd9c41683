"""Wire constants of the zembed protocols: one home for every byte and number on the wire.

``docs/protocol.md`` is the specification; this module is its executable form. Nothing here
touches a socket, so the broker, engines and clients (and tests) share it freely.
"""

from __future__ import annotations

from typing import Final

#: First frame of every client <-> broker message. Bumped only on an incompatible change.
CLIENT_PROTO: Final = b"ZEC1"
#: First frame of every engine <-> broker message.
ENGINE_PROTO: Final = b"ZEW1"
#: Protocol version number carried in READY, so a broker can refuse a newer engine politely.
ENGINE_PROTO_VERSION: Final = 1

# Engine commands (second frame, one byte), Majordomo style.
READY: Final = b"\x01"
REQUEST: Final = b"\x02"
REPLY: Final = b"\x03"
HEARTBEAT: Final = b"\x04"
DISCONNECT: Final = b"\x05"
ENGINE_COMMANDS: Final = frozenset({READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT})

# Client operations (``op`` in the request header).
OP_EMBED: Final = "embed"
OP_PING: Final = "ping"
OP_HEALTH: Final = "health"
OP_READY: Final = "ready"
OP_STATS: Final = "stats"
#: The broker's limits and, per lane, its model and the largest request it can take.
OP_INFO: Final = "info"
MANAGEMENT_OPS: Final = frozenset({OP_PING, OP_HEALTH, OP_READY, OP_STATS, OP_INFO})

# Status codes, in the HTTP / MMI tradition.
OK: Final = 200
BAD_REQUEST: Final = 400
UNKNOWN_LANE: Final = 404
TOO_LARGE: Final = 413
OVERLOADED: Final = 429
ENGINE_ERROR: Final = 500
UNAVAILABLE: Final = 503
DEADLINE_EXCEEDED: Final = 504
STATUSES: Final = (
    OK, BAD_REQUEST, UNKNOWN_LANE, TOO_LARGE, OVERLOADED, ENGINE_ERROR, UNAVAILABLE,
    DEADLINE_EXCEEDED,
)

# Lanes and the kinds of input each serves.
LANE_TEXT: Final = "text"
LANE_IMAGE: Final = "image"
KIND_TEXT: Final = "text"
KIND_IMAGE: Final = "image"
KIND_CLIP_TEXT: Final = "clip-text"
#: Kinds whose items are UTF-8 strings (the others are bytes).
TEXT_KINDS: Final = frozenset({KIND_TEXT, KIND_CLIP_TEXT})

# Vector encodings on the wire (``dtype`` in headers). Both are little-endian, row-major.
DTYPE_F32: Final = "f32"
DTYPE_BF16: Final = "bf16"
DTYPES: Final = frozenset({DTYPE_F32, DTYPE_BF16})

# Optional prompt selection for asymmetric models (``input_type`` in the embed header).
#: Prompt names every lane accepts (an engine without that prompt applies no prefix).
INPUT_TYPES: Final = frozenset({"query", "document"})
#: Any other ``input_type`` must look like a prompt name (1-64 of these characters) and be one
#: of the ``prompts`` the lane's engine announced in READY.
INPUT_TYPE_CHARS: Final = "A-Za-z0-9_.:-"
MAX_INPUT_TYPE_CHARS: Final = 64

# Request classes (``priority`` in the embed header): a search query with a user waiting,
# or bulk indexing. Bulk requests may not take the credits kept for interactive ones, and
# engines put interactive jobs first in every batch.
PRIORITY_INTERACTIVE: Final = "interactive"
PRIORITY_BULK: Final = "bulk"
PRIORITIES: Final = frozenset({PRIORITY_INTERACTIVE, PRIORITY_BULK})

# Timing defaults (milliseconds).
HEARTBEAT_INTERVAL_MS: Final = 1000
#: An engine (or broker) silent for this many intervals is dead.
HEARTBEAT_LIVENESS: Final = 3
DEFAULT_DEADLINE_MS: Final = 10_000
#: Engines reconnect with exponential backoff between these bounds.
RECONNECT_MIN_MS: Final = 250
RECONNECT_MAX_MS: Final = 8_000

# Default endpoints: loopback only; binding wider is an explicit choice.
DEFAULT_FRONTEND: Final = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND: Final = "tcp://127.0.0.1:5556"
#: The broker's stats PUB socket (one msgpack snapshot per interval; see docs/stats.md).
DEFAULT_STATS: Final = "tcp://127.0.0.1:5557"

#: Kinds each lane serves; a request's ``kind`` must belong to its ``lane``.
LANE_KINDS: Final = {
    LANE_TEXT: frozenset({KIND_TEXT}),
    LANE_IMAGE: frozenset({KIND_IMAGE, KIND_CLIP_TEXT}),
}

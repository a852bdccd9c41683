"""Encoding and validation of zembed messages, shared by broker, engines and clients.

Only headers are msgpack; bodies are a msgpack list of items (requests) or one raw vector buffer
(replies). Validation raises the typed errors of :mod:`zembed.errors`, so the broker's reply
status is simply ``exc.status``. No sockets here: everything is unit-testable.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from zembed import protocol as p
from zembed.errors import BadRequest, TooLarge, UnknownLane

#: Headers are small maps; anything bigger is hostile or broken.
MAX_HEADER_BYTES = 16 * 1024
#: An engine REPLY carries ``item_errors`` (up to ~250 bytes each, one per failed item of up to
#: its credits), so 16 KiB is too little: 64 failed URL fetches would lose the whole reply.
MAX_ENGINE_HEADER_BYTES = 1 << 20
_U64_MAX = (1 << 64) - 1


_local = threading.local()


def packb(obj: Any) -> bytes:
    """msgpack with zembed's conventions (bin type for bytes, str for text).

    One Packer per thread, reused: it keeps its buffer between calls instead of allocating a
    packer and a buffer for every header on the hot path (a Packer is not thread-safe).
    """
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    return packer.pack(obj)  # type: ignore[no-any-return]


class HeaderRefused(BadRequest):
    """A header refused (400) although it may carry a readable request id.

    ``rid`` is the id found under the string key ``"id"`` of a complete msgpack map (or None),
    so the broker can answer even an oversized header, or one with a non-string key, with the
    client's id and the client can match the refusal to its request instead of timing out.
    """

    def __init__(self, message: str, rid: int | None) -> None:
        super().__init__(message)
        self.rid = rid


#: msgpack's names for the Python types a decoder yields, for error texts a client can act on.
_MSGPACK_TYPES = {"NoneType": "nil", "bool": "bool", "int": "int", "float": "float",
                  "str": "str", "bytes": "bin", "list": "array", "tuple": "array",
                  "dict": "map", "ExtType": "ext", "Timestamp": "timestamp"}


def msgpack_type(value: Any) -> str:
    """The msgpack type name of a decoded value (``array``, not Python's ``list``)."""
    name = type(value).__name__
    return _MSGPACK_TYPES.get(name, name)


def describe_msgpack_error(exc: BaseException) -> str:
    """Name what is wrong with undecodable msgpack: the exception type and a description.

    Some msgpack exceptions (FormatError, StackError) carry no text at all, which would leave an
    error reply ending in a bare colon; this says what they mean.
    """
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, msgpack.StackError):
        return f"{name}: nesting too deep"
    if isinstance(exc, msgpack.FormatError):
        return f"{name}: malformed data (a byte that starts no msgpack type, such as 0xc1)"
    if isinstance(exc, msgpack.ExtraData):
        return f"{name}: extra bytes after the first msgpack object"
    if "incomplete input" in text or isinstance(exc, msgpack.OutOfData):
        return f"{name}: truncated data (the input ends inside a msgpack object)"
    if isinstance(exc, UnicodeDecodeError):
        return f"{name}: a msgpack str is not valid UTF-8 ({exc.reason} at its byte {exc.start})"
    if "is not allowed for map key" in text:  # a nested map's key (strict_map_key)
        key_type = _MSGPACK_TYPES.get(text.split()[0], text.split()[0])
        return f"{name}: a map has a key of type {key_type}; maps take str keys"
    return f"{name}: {text}" if text else f"{name}: undecodable msgpack"


#: A header map with more entries than this is not scanned for its id (legit ones have ~10).
MAX_SCANNED_ENTRIES = 1024


def _type_of_first_byte(byte: int) -> str:
    """The msgpack type an object starting with ``byte`` has, without decoding the object."""
    if byte <= 0x7F or byte >= 0xE0 or 0xCC <= byte <= 0xD3:
        return "int"
    if 0xA0 <= byte <= 0xBF or 0xD9 <= byte <= 0xDB:
        return "str"
    if byte <= 0x8F or byte in (0xDE, 0xDF):
        return "map"
    if byte <= 0x9F or byte in (0xDC, 0xDD):
        return "array"
    return {0xC0: "nil", 0xC2: "bool", 0xC3: "bool", 0xC4: "bin", 0xC5: "bin", 0xC6: "bin",
            0xCA: "float", 0xCB: "float"}.get(byte, "ext")


def _scan_map(raw: bytes) -> tuple[int | None, str | None]:
    """(request id, msgpack type of the first non-str key) of a header that is one whole map.

    Streams through the map without building it: values other than the id are skipped and a
    non-str key is judged by its first byte, so even an oversized header (which the broker's
    max message size bounds) costs about one C-speed pass over its bytes and at most
    ``MAX_SCANNED_ENTRIES`` Python steps. (None, None) unless ``raw`` starts with a complete
    msgpack map; the last ``"id"`` wins, as in a decode.
    """
    rid: int | None = None
    bad_key: str | None = None
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(raw), 1))
    try:
        unpacker.feed(raw)
        entries = unpacker.read_map_header()
        if entries > MAX_SCANNED_ENTRIES:
            return None, None
        for _ in range(entries):
            key_type = _type_of_first_byte(raw[unpacker.tell()])
            if key_type == "str":
                if unpacker.unpack() == "id":
                    rid = request_id({"id": unpacker.unpack()})
                    continue
            else:
                bad_key = bad_key or key_type
                unpacker.skip()
            unpacker.skip()
    except Exception:  # not a map, or not a complete one: no id to trust
        return None, None
    return rid, bad_key


def unpack_header(raw: bytes, limit: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode a header frame into a dict with string keys, or raise BadRequest.

    ``limit`` is the largest header accepted: 16 KiB from clients; engines get
    :data:`MAX_ENGINE_HEADER_BYTES`, since a REPLY lists one error per failed item.

    A key whose value is nil is dropped: nil means "absent" in every header (JavaScript msgpack
    encoders write ``undefined``/``null`` as nil), so optional fields take their default and a
    required one is reported missing. A refusal of a header that is a complete map is a
    :class:`HeaderRefused` carrying the map's id, so even that 400 reaches the right request.
    """
    if len(raw) > limit:
        raise HeaderRefused(f"header is {len(raw)} bytes, at most {limit} allowed",
                            _scan_map(raw)[0])
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        rid, bad_key = _scan_map(raw)
        if bad_key is not None:
            raise HeaderRefused(f"header map keys must be msgpack str, found a key of type "
                                f"{bad_key}", rid) from None
        raise HeaderRefused(f"header is not valid msgpack: {describe_msgpack_error(exc)}",
                            rid) from None
    if not isinstance(header, dict):
        raise BadRequest(f"header must be a msgpack map, got {msgpack_type(header)}")
    for key in header:  # msgpack lets bin keys through strict_map_key; the protocol does not
        if not isinstance(key, str):
            raise HeaderRefused(f"header map keys must be msgpack str, found a key of type "
                                f"{msgpack_type(key)}", request_id(header))
    if None in header.values():
        header = {k: v for k, v in header.items() if v is not None}
    return header


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request limits the broker enforces (413 above them)."""

    max_items: int = 256
    max_item_bytes: int = 65_536
    max_image_bytes: int = 10 << 20
    max_request_bytes: int = 64 << 20
    default_deadline_ms: int = p.DEFAULT_DEADLINE_MS
    max_deadline_ms: int = 300_000


@dataclass(slots=True)
class EmbedRequest:
    """A validated client ``embed`` request."""

    id: int
    lane: str
    kind: str
    normalize: bool
    dtype: str
    deadline_ms: int
    items: list[Any]
    input_type: str | None = None
    dimensions: int | None = None
    priority: str = p.PRIORITY_INTERACTIVE


def request_id(header: dict[str, Any]) -> int | None:
    """The request id if the header has a well-formed one (so even a 400 can be matched)."""
    rid = header.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= _U64_MAX:
        return rid
    return None


def brief(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for an error text, cut at ``limit`` characters with an ellipsis.

    A bare cut could end an error on ``": "`` (a map's key) and read as if the reason were
    missing; the ellipsis says the value goes on.
    """
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _field(header: dict[str, Any], name: str, typ: type, default: Any) -> Any:
    """``header[name]`` checked to be ``typ``; absent or nil gives ``default`` (None: absent)."""
    value = header.get(name)
    if value is None:
        value = default
        if value is None:
            return None
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise BadRequest(f"header field {name!r} must be {typ.__name__}, got {brief(value)}")
    return value


class EmbedHeader(NamedTuple):
    """The fields of a valid embed header (a tuple, so callers may unpack it)."""

    lane: str
    kind: str
    normalize: bool
    dtype: str
    deadline_ms: int
    n: int
    input_type: str | None
    dimensions: int | None
    priority: str = p.PRIORITY_INTERACTIVE
    ticket: int | None = None


_PROMPT_NAME = re.compile(f"[{p.INPUT_TYPE_CHARS}]{{1,{p.MAX_INPUT_TYPE_CHARS}}}")


def is_prompt_name(name: str) -> bool:
    """Whether ``name`` has the form of an ``input_type`` (1-64 of ``[A-Za-z0-9_.:-]``)."""
    return _PROMPT_NAME.fullmatch(name) is not None


def parse_input_type(header: dict[str, Any]) -> str | None:
    """``input_type``: a prompt name (1-64 of ``[A-Za-z0-9_.:-]``) or absent.

    Only its form is checked here: whether the lane's model has that prompt is known only to
    the broker's lane state (``query`` and ``document`` are always accepted there).
    """
    input_type: str | None = _field(header, "input_type", str, None)
    if input_type is not None and not is_prompt_name(input_type):
        raise BadRequest(f"input_type must be a prompt name of 1-{p.MAX_INPUT_TYPE_CHARS} "
                         f"characters from [{p.INPUT_TYPE_CHARS}] (such as "
                         f"{' or '.join(sorted(p.INPUT_TYPES))}), got {brief(input_type, 80)}")
    return input_type


def default_priority(input_type: str | None) -> str:
    """The class of a request that names none: ``document`` requests are bulk, everything
    else is interactive (a query, or a caller that did not say)."""
    return p.PRIORITY_BULK if input_type == "document" else p.PRIORITY_INTERACTIVE


def parse_priority(header: dict[str, Any], input_type: str | None) -> str:
    """``priority``: ``interactive`` or ``bulk``; absent, :func:`default_priority`."""
    priority: str | None = _field(header, "priority", str, None)
    if priority is None:
        return default_priority(input_type)
    if priority not in p.PRIORITIES:
        raise BadRequest(f"priority must be one of {sorted(p.PRIORITIES)}, got "
                         f"{brief(priority, 40)}")
    return priority


def parse_ticket(header: dict[str, Any]) -> int | None:
    """``ticket``: 0 (refuse me with a ticket: I will retry), a ticket a 429 gave this
    request, or absent (no ticket wanted)."""
    ticket: int | None = _field(header, "ticket", int, None)
    if ticket is not None and not 0 <= ticket <= _U64_MAX:
        raise BadRequest(f"ticket must be 0 or a ticket from a 429 reply, got {ticket}")
    return ticket


def parse_dimensions(header: dict[str, Any]) -> int | None:
    """``dimensions``: a positive int or absent; the lane's dim bounds it later (the broker)."""
    dimensions: int | None = _field(header, "dimensions", int, None)
    if dimensions is not None and dimensions < 1:
        raise BadRequest(f"dimensions must be a positive int, got {dimensions}")
    return dimensions


def parse_embed_header(
    header: dict[str, Any], lane_kinds: dict[str, frozenset[str]], limits: Limits
) -> EmbedHeader:
    """Validate an embed header (what can be judged without the lane's model)."""
    lane = _field(header, "lane", str, p.LANE_TEXT)
    if lane not in lane_kinds:
        raise UnknownLane(f"unknown lane {brief(lane)}; this broker serves {sorted(lane_kinds)}")
    kind = _field(header, "kind", str, lane)
    if kind not in lane_kinds[lane]:
        raise BadRequest(f"lane {lane!r} serves kinds {sorted(lane_kinds[lane])}, not {brief(kind)}")
    normalize = _field(header, "normalize", bool, True)
    dtype = _field(header, "dtype", str, p.DTYPE_F32)
    if dtype not in p.DTYPES:
        raise BadRequest(f"dtype must be one of {sorted(p.DTYPES)}, got {brief(dtype)}")
    deadline_ms = _field(header, "deadline_ms", int, limits.default_deadline_ms)
    if deadline_ms <= 0:
        raise BadRequest(f"deadline_ms must be positive, got {deadline_ms}")
    deadline_ms = min(deadline_ms, limits.max_deadline_ms)
    n = _field(header, "n", int, None)
    if n is None:
        raise BadRequest("header field 'n' (number of items) is required")
    if n <= 0:
        raise BadRequest(f"a request needs at least one item, n={n}")
    if n > limits.max_items:
        raise TooLarge(f"{n} items in one request, at most {limits.max_items} allowed")
    input_type = parse_input_type(header)
    return EmbedHeader(lane, kind, normalize, dtype, deadline_ms, n, input_type,
                       parse_dimensions(header), parse_priority(header, input_type),
                       parse_ticket(header))


def parse_items(body: bytes | memoryview, kind: str, n: int, limits: Limits) -> list[Any]:
    """Decode and check the item list of an embed request body."""
    if len(body) > limits.max_request_bytes:
        raise TooLarge(f"request body is {len(body)} bytes, at most {limits.max_request_bytes}")
    try:
        items = msgpack.unpackb(body, raw=False, max_array_len=n, max_map_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise BadRequest(f"body is not a msgpack array of n={n} items: "
                         f"{_describe_body_error(exc, n)}") from None
    if not isinstance(items, list) or len(items) != n:
        got = f"{len(items)} items" if isinstance(items, list) else msgpack_type(items)
        raise BadRequest(f"body must be a msgpack array of n={n} items, got {got}")
    check = _check_text if kind in p.TEXT_KINDS else _check_image
    for i, item in enumerate(items):
        check(i, item, limits)
    return items


def _describe_body_error(exc: BaseException, n: int) -> str:
    """Say which body limit was hit in the client's terms, not in msgpack's option names."""
    text = str(exc)
    if "exceeds max_map_len" in text:
        return "it holds a msgpack map; items are str or bin"
    if "exceeds max_ext_len" in text:
        return "it holds a msgpack ext value; items are str or bin"
    if "exceeds max_array_len" in text:
        return f"it holds an array of {text.split()[0]} entries; n={n} (items are never arrays)"
    return describe_msgpack_error(exc)


#: Image items may be text only as one of these (the engine decodes or fetches them).
IMAGE_URI_PREFIXES = ("data:", "http://", "https://")


def _check_text(i: int, item: Any, limits: Limits) -> None:
    if not isinstance(item, str):
        raise BadRequest(f"item {i} must be str, got {msgpack_type(item)}")
    size = len(item)
    if size * 4 > limits.max_item_bytes:  # only then can the UTF-8 size exceed the limit
        size = len(item.encode("utf-8", "surrogatepass"))
    if size > limits.max_item_bytes:
        raise TooLarge(f"item {i} is {size} bytes, at most {limits.max_item_bytes} allowed")


def _check_image(i: int, item: Any, limits: Limits) -> None:
    if isinstance(item, str):
        if not item.startswith(IMAGE_URI_PREFIXES):
            raise BadRequest(f"image item {i} must be bytes, a data: URI or an http(s) URL")
    elif not isinstance(item, bytes):
        raise BadRequest(f"image item {i} must be bin or str, got {msgpack_type(item)}")
    if len(item) > limits.max_image_bytes:
        raise TooLarge(f"image item {i} is {len(item)} bytes, at most {limits.max_image_bytes}")


def reply_header(
    rid: int | None,
    status: int,
    *,
    error: str | None = None,
    retry_after_ms: int | None = None,
    dtype: str | None = None,
    shape: tuple[int, int] | None = None,
    cached: list[int] | None = None,
    item_errors: list[list[Any]] | None = None,
    ticket: int | None = None,
) -> bytes:
    """Encode a broker -> client reply header (absent fields are omitted, not null)."""
    h: dict[str, Any] = {"id": rid, "status": status}
    if error is not None:
        h["error"] = error
    if retry_after_ms is not None:
        h["retry_after_ms"] = retry_after_ms
    if ticket is not None:
        h["ticket"] = ticket
    if dtype is not None:
        h["dtype"] = dtype
        h["shape"] = list(shape or (0, 0))
        h["cached"] = len(cached or ())
        if cached:
            h["cached_idx"] = cached
    if item_errors:
        h["item_errors"] = item_errors
    return packb(h)

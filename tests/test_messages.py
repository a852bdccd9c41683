"""Header and body validation: each malformed case maps to its documented status."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zembed import protocol as p
from zembed.errors import BadRequest, TooLarge, UnknownLane, ZembedError
from zembed.messages import (
    MAX_ENGINE_HEADER_BYTES,
    MAX_HEADER_BYTES,
    MAX_SCANNED_ENTRIES,
    HeaderRefused,
    Limits,
    parse_embed_header,
    parse_items,
    request_id,
    unpack_header,
)

LIMITS = Limits(max_items=8, max_item_bytes=32, max_request_bytes=1024)
LANES = {"text": p.LANE_KINDS["text"], "image": p.LANE_KINDS["image"]}


def header(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"op": "embed", "id": 1, "lane": "text", "n": 2}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


def test_defaults() -> None:
    lane, kind, norm, dtype, deadline, n, itype, dims, prio, ticket = parse_embed_header(
        header(), LANES, LIMITS)
    assert (lane, kind, norm, dtype, deadline, n, itype, dims, prio, ticket) == (
        "text", "text", True, "f32", p.DEFAULT_DEADLINE_MS, 2, None, None, "interactive", None)


def test_ticket() -> None:
    assert parse_embed_header(header(ticket=0), LANES, LIMITS).ticket == 0
    assert parse_embed_header(header(ticket=2**48 - 1), LANES, LIMITS).ticket == 2**48 - 1
    for bad in (-1, "7", 1.5, True):
        with pytest.raises(BadRequest, match="ticket"):
            parse_embed_header(header(ticket=bad), LANES, LIMITS)


@pytest.mark.parametrize(("fields", "priority"), [
    ({}, "interactive"), ({"input_type": "query"}, "interactive"),
    ({"input_type": "document"}, "bulk"), ({"input_type": "passage"}, "interactive"),
    ({"priority": "bulk"}, "bulk"), ({"input_type": "document", "priority": "interactive"},
                                     "interactive"),
])
def test_priority_is_named_or_follows_input_type(fields: dict[str, Any], priority: str) -> None:
    assert parse_embed_header(header(**fields), LANES, LIMITS).priority == priority


@pytest.mark.parametrize(("fields", "error"), [
    ({"lane": "audio"}, UnknownLane),
    ({"lane": 7}, BadRequest),
    ({"kind": "image"}, BadRequest),
    ({"normalize": 1}, BadRequest),
    ({"dtype": "f16"}, BadRequest),
    ({"deadline_ms": 0}, BadRequest),
    ({"deadline_ms": "soon"}, BadRequest),
    ({"n": ...}, BadRequest),
    ({"n": 0}, BadRequest),
    ({"n": True}, BadRequest),
    ({"n": 9}, TooLarge),
    ({"input_type": ""}, BadRequest),
    ({"input_type": "a b"}, BadRequest),
    ({"input_type": "query\n"}, BadRequest),
    ({"input_type": "x" * 65}, BadRequest),
    ({"input_type": "é"}, BadRequest),
    ({"input_type": 7}, BadRequest),
    ({"dimensions": 0}, BadRequest),
    ({"dimensions": -3}, BadRequest),
    ({"dimensions": True}, BadRequest),
    ({"dimensions": 128.0}, BadRequest),
    ({"dimensions": "128"}, BadRequest),
    ({"priority": "urgent"}, BadRequest),
    ({"priority": 1}, BadRequest),
])
def test_bad_headers(fields: dict[str, Any], error: type[ZembedError]) -> None:
    with pytest.raises(error):
        parse_embed_header(header(**fields), LANES, LIMITS)


@pytest.mark.parametrize("name", ["query", "document", "passage", "Retrieval-query",
                                  "search_query:v2", "a.b", "x" * 64])
def test_any_prompt_name_passes_header_parsing(name: str) -> None:
    """Whether the lane's model has the prompt is the broker's to judge, not the parser's."""
    assert parse_embed_header(header(input_type=name), LANES, LIMITS).input_type == name


@pytest.mark.parametrize("dims", [1, 64, 384, 10**6])
def test_dimensions_is_any_positive_int_here(dims: int) -> None:
    """The lane's dim bounds it later (the broker, which knows the model)."""
    assert parse_embed_header(header(dimensions=dims), LANES, LIMITS).dimensions == dims


def test_bad_dimensions_and_input_type_say_what_is_wanted() -> None:
    with pytest.raises(BadRequest, match="'dimensions' must be int, got True"):
        parse_embed_header(header(dimensions=True), LANES, LIMITS)
    with pytest.raises(BadRequest, match="dimensions must be a positive int, got 0"):
        parse_embed_header(header(dimensions=0), LANES, LIMITS)
    with pytest.raises(BadRequest, match=r"input_type must be a prompt name of 1-64 characters "
                                         r"from \[A-Za-z0-9_.:-\]"):
        parse_embed_header(header(input_type="two words"), LANES, LIMITS)


def test_a_long_bad_value_is_cut_with_an_ellipsis_not_on_a_colon() -> None:
    """Found by the hostile-header fuzz: a map cut after its first key read ``got {'…':``, an
    error that seems to stop before its reason."""
    value = {"a" * 56: "b"}
    assert repr(value)[:60].endswith(":")
    with pytest.raises(BadRequest) as info:
        parse_embed_header(header(dtype=value), LANES, LIMITS)
    assert info.value.message.endswith("…") and len(info.value.message) < 120


def test_deadline_is_capped() -> None:
    assert parse_embed_header(header(deadline_ms=10**9), LANES, LIMITS)[4] == LIMITS.max_deadline_ms


@pytest.mark.parametrize(("body", "n", "error"), [
    (b"\xc1", 1, BadRequest),  # never-used msgpack byte
    (msgpack.packb("one"), 1, BadRequest),
    (msgpack.packb(["a", "b"]), 3, BadRequest),
    (msgpack.packb(["a", "b", "c"]), 2, BadRequest),
    (msgpack.packb(["a", b"b"]), 2, BadRequest),
    (msgpack.packb(["a", 3]), 2, BadRequest),
    (b"\x92\xa1a\xa2\xff\xfe", 2, BadRequest),  # invalid UTF-8 in a str
    (msgpack.packb(["a", "x" * 33]), 2, TooLarge),
    (msgpack.packb(["a", "é" * 17]), 2, TooLarge),  # 34 UTF-8 bytes
    (msgpack.packb(["x" * 30] * 40), 40, TooLarge),  # body over 1024 bytes
    (b"\xdd\xff\xff\xff\xff", 2, BadRequest),  # array declaring 4 billion items
])
def test_bad_bodies(body: bytes, n: int, error: type[ZembedError]) -> None:
    with pytest.raises(error):
        parse_items(body, "text", n, LIMITS)


def test_good_bodies() -> None:
    assert parse_items(msgpack.packb(["", "é" * 16]), "text", 2, LIMITS) == ["", "é" * 16]
    assert parse_items(msgpack.packb([b"\x89PNG"]), "image", 1, LIMITS) == [b"\x89PNG"]
    uris = ["data:image/png;base64,AAAA", "https://example.com/a.jpg"]
    assert parse_items(msgpack.packb(uris), "image", 2, LIMITS) == uris
    assert parse_items(msgpack.packb([b""]), "image", 1, LIMITS) == [b""]  # the engine says why


@pytest.mark.parametrize(("items", "error"), [
    (["just text"], BadRequest),
    ([7], BadRequest),
    (["file:///etc/passwd"], BadRequest),
    ([b"x" * 2000], TooLarge),
])
def test_bad_image_items(items: list[Any], error: type[ZembedError]) -> None:
    limits = Limits(max_items=8, max_image_bytes=1000)
    with pytest.raises(error):
        parse_items(msgpack.packb(items), "image", len(items), limits)


@pytest.mark.parametrize("raw", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}),
                                 b"\x81" + b"\x00" * 20_000])
def test_bad_header_frames(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        unpack_header(raw)


# -- a refused header keeps its id, so the client can match the 400 to its request -----------

PAD = "x" * 20_000  # pushes a header over MAX_HEADER_BYTES


@pytest.mark.parametrize(("raw", "rid", "text"), [
    (msgpack.packb({"id": 9, "pad": PAD}), 9, "header is 20012 bytes, at most 16384 allowed"),
    (msgpack.packb({"pad": PAD, "id": 9}), 9, "header is 20012 bytes"),  # id after the bulk
    (msgpack.packb({"id": 9, 1: 2}), 9, "header map keys must be msgpack str, found a key of "
                                        "type int"),
    (msgpack.packb({(1, 2): 3, "id": 4}), 4, "found a key of type array"),
    (msgpack.packb({"id": 9, b"op": "ping"}), 9, "found a key of type bin"),
    (msgpack.packb({"id": 9, "x": {1: 2}}), 9, "a map has a key of type int; maps take str keys"),
    (msgpack.packb({"id": 9}) + b"\x00", 9, "ExtraData: extra bytes after the first"),
    (b"\x82\xa2id\x09\xa1a\xa2\xff\xfe", 9, "UnicodeDecodeError: a msgpack str is not valid UTF-8"),
    (msgpack.packb({"pad": PAD}), None, "header is 20008 bytes"),
    (msgpack.packb({"id": -5, 1: 1}), None, "found a key of type int"),  # no valid id in it
    (msgpack.packb({"id": 9, "pad": PAD})[:-10], None, "header is 20002 bytes"),  # cut short
])
def test_refused_header_keeps_a_valid_id(raw: bytes, rid: int | None, text: str) -> None:
    with pytest.raises(HeaderRefused) as info:
        unpack_header(raw)
    assert info.value.status == p.BAD_REQUEST
    assert info.value.rid == rid
    assert text in info.value.message, info.value.message


ids = st.integers(0, 2**64 - 1)
keys = st.one_of(st.text(max_size=6), st.integers(-(2**63), 2**64 - 1), st.binary(max_size=6))
junk = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                              st.text(max_size=8), st.binary(max_size=8)),
                    lambda kids: st.lists(kids, max_size=3), max_leaves=6)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(rid=ids, others=st.dictionaries(keys, junk, max_size=5), pad=st.integers(0, 20_000),
       trailer=st.binary(max_size=3))
def test_any_map_with_a_valid_id_is_answered_with_that_id(
    rid: int, others: dict[Any, Any], pad: int, trailer: bytes
) -> None:
    """Whatever else is wrong with a header that is a whole map, its id is never lost."""
    others = {k: v for k, v in others.items() if k != "id"}
    raw = msgpack.packb({**others, "pad": "x" * pad, "id": rid}) + trailer
    try:
        header = unpack_header(raw)
    except HeaderRefused as exc:
        assert exc.rid == rid
        assert not exc.message.endswith(": "), exc.message
    else:
        assert request_id(header) == rid


# -- undecodable msgpack is named, never "…: " with nothing after the colon ------------------

@pytest.mark.parametrize(("raw", "text"), [
    (b"", "header is not valid msgpack: ValueError: truncated data"),
    (b"\xc1", "header is not valid msgpack: FormatError: malformed data"),
    (b"\x91" * 5000, "header is not valid msgpack: StackError: nesting too deep"),
    (b"\x81" + b"\x91" * 5000, "header is not valid msgpack: StackError: nesting too deep"),
    (b"\x82\xa2id\x01", "header is not valid msgpack: ValueError: truncated data"),
    (msgpack.packb([1, 2]), "header must be a msgpack map, got array"),
])
def test_undecodable_header_names_the_problem(raw: bytes, text: str) -> None:
    with pytest.raises(BadRequest) as info:
        unpack_header(raw)
    assert info.value.message.startswith(text), info.value.message


@pytest.mark.parametrize(("body", "text"), [
    (b"\xc1", "FormatError: malformed data"),
    (b"\x91" * 5000, "StackError: nesting too deep"),
    (b"\x92\xa1a", "ValueError: truncated data"),
    (b"", "ValueError: truncated data"),
    (msgpack.packb(["a"]) + b"\x00", "ExtraData: extra bytes after the first msgpack object"),
    (b"\x92\xa1a\xa2\xff\xfe", "UnicodeDecodeError: a msgpack str is not valid UTF-8"),
    (msgpack.packb({"a": 1}), "it holds a msgpack map; items are str or bin"),
    (msgpack.packb(["a", [1, 2, 3]]), "it holds an array of 3 entries; n=2"),
    (b"\xdd\xff\xff\xff\xff", "it holds an array of 4294967295 entries; n=2"),
    (b"\x92\xa1a\xd4\x01\x00", "it holds a msgpack ext value"),
])
def test_undecodable_body_names_the_problem(body: bytes, text: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_items(body, "text", 2, Limits(max_items=8, max_item_bytes=32))
    assert info.value.message.startswith(f"body is not a msgpack array of n=2 items: {text}"), \
        info.value.message


def test_wrong_item_types_are_named_in_msgpack_terms() -> None:
    with pytest.raises(BadRequest, match="item 1 must be str, got bin"):
        parse_items(msgpack.packb(["a", b"b"]), "text", 2, LIMITS)
    with pytest.raises(BadRequest, match="image item 0 must be bin or str, got array"):
        parse_items(msgpack.packb([[1]]), "image", 1, LIMITS)


# -- nil is "absent" for every optional field; required fields still need a value ------------

OPTIONAL = ["lane", "kind", "normalize", "dtype", "deadline_ms", "input_type", "dimensions",
            "priority", "ticket"]


def test_nil_optional_fields_take_their_defaults() -> None:
    h = header(**{name: None for name in OPTIONAL})
    assert parse_embed_header(h, LANES, LIMITS) == (
        "text", "text", True, "f32", p.DEFAULT_DEADLINE_MS, 2, None, None, "interactive", None)


def test_unpack_header_drops_nil_values() -> None:
    raw = msgpack.packb({"id": 3, "op": None, "lane": None, "n": 1, "x": None})
    assert unpack_header(raw) == {"id": 3, "n": 1}


@pytest.mark.parametrize("name", ["id", "n"])
def test_nil_required_fields_are_still_missing(name: str) -> None:
    h = unpack_header(msgpack.packb(header(**{name: None})))
    assert name not in h
    if name == "n":
        with pytest.raises(BadRequest, match=r"'n' .* is required"):
            parse_embed_header(h, LANES, LIMITS)
    else:
        assert request_id(h) is None


def test_a_map_of_more_entries_than_scanned_gives_no_id() -> None:
    """The id scan is bounded (a hostile header must not stall the broker loop): past
    MAX_SCANNED_ENTRIES entries a refused header is answered without its id."""
    small = {str(i): 0 for i in range(MAX_SCANNED_ENTRIES - 2)}
    with pytest.raises(HeaderRefused) as info:
        unpack_header(msgpack.packb({**small, "id": 7, 1: 2}))
    assert info.value.rid == 7
    big = {str(i): 0 for i in range(MAX_SCANNED_ENTRIES)}
    with pytest.raises(HeaderRefused) as info:
        unpack_header(msgpack.packb({**big, "id": 7, 1: 2}))
    assert info.value.rid is None
    assert "a map has a key of type int" in info.value.message


def test_engine_headers_may_be_larger_than_client_headers() -> None:
    """A REPLY listing 200 failed items is ~50 KiB: refused from a client, read from an engine."""
    errors = [[i, 400, "download failed: " + "x" * 200] for i in range(200)]
    raw = msgpack.packb({"tok": 1, "status": 200, "item_errors": errors})
    assert len(raw) > MAX_HEADER_BYTES
    with pytest.raises(BadRequest):
        unpack_header(raw)
    assert unpack_header(raw, MAX_ENGINE_HEADER_BYTES)["item_errors"] == errors

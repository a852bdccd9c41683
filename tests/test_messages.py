"""Header and body validation: each malformed case maps to its documented status."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from zembed import protocol as p
from zembed.errors import BadRequest, TooLarge, UnknownLane, ZembedError
from zembed.messages import Limits, parse_embed_header, parse_items, unpack_header

LIMITS = Limits(max_items=8, max_item_bytes=32, max_request_bytes=1024)
LANES = {"text": p.LANE_KINDS["text"], "image": p.LANE_KINDS["image"]}


def header(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"op": "embed", "id": 1, "lane": "text", "n": 2}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


def test_defaults() -> None:
    lane, kind, norm, dtype, deadline, n, itype = parse_embed_header(header(), LANES, LIMITS)
    assert (lane, kind, norm, dtype, deadline, n, itype) == (
        "text", "text", True, "f32", p.DEFAULT_DEADLINE_MS, 2, None)


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
    ({"input_type": "passage"}, BadRequest),
])
def test_bad_headers(fields: dict[str, Any], error: type[ZembedError]) -> None:
    with pytest.raises(error):
        parse_embed_header(header(**fields), LANES, LIMITS)


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

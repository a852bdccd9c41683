"""Malformed frames, headers and bodies get their documented status; service goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from conftest import recv

from zembed import protocol as p
from zembed.client import Client

P = p.CLIENT_PROTO


def hdr(**kw: Any) -> bytes:
    base: dict[str, Any] = {"op": "embed", "id": 7, "lane": "text", "n": 1}
    base.update(kw)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...})


BODY = msgpack.packb(["hello"])

CASES: list[tuple[str, list[bytes], int]] = [
    ("one frame", [P], 400),
    ("wrong protocol id", [b"HTTP/1.1", hdr(), BODY], 400),
    ("header not msgpack", [P, b"\xc1\xc1", BODY], 400),
    ("header not a map", [P, msgpack.packb([1, 2]), BODY], 400),
    ("header with int keys", [P, msgpack.packb({1: 2}), BODY], 400),
    ("no id", [P, hdr(id=...), BODY], 400),
    ("negative id", [P, hdr(id=-1), BODY], 400),
    ("float id", [P, hdr(id=1.5), BODY], 400),
    ("string id", [P, hdr(id="7"), BODY], 400),
    ("unknown op", [P, hdr(op="explode"), BODY], 400),
    ("missing body", [P, hdr()], 400),
    ("extra frame", [P, hdr(), BODY, b"more"], 400),
    ("unknown lane", [P, hdr(lane="audio"), BODY], 404),
    ("kind of another lane", [P, hdr(kind="image"), BODY], 400),
    ("normalize not bool", [P, hdr(normalize="yes"), BODY], 400),
    ("bad dtype", [P, hdr(dtype="f64"), BODY], 400),
    ("zero deadline", [P, hdr(deadline_ms=0), BODY], 400),
    ("n missing", [P, hdr(n=...), BODY], 400),
    ("n zero", [P, hdr(n=0), msgpack.packb([])], 400),
    ("n mismatch", [P, hdr(n=2), BODY], 400),
    ("body not msgpack", [P, hdr(), b"\xc1"], 400),
    ("body not a list", [P, hdr(), msgpack.packb({"a": 1})], 400),
    ("bytes item on the text lane", [P, hdr(), msgpack.packb([b"raw"])], 400),
    ("int item", [P, hdr(), msgpack.packb([5])], 400),
    ("invalid UTF-8", [P, hdr(), b"\x91\xa2\xff\xfe"], 400),
    ("huge declared array", [P, hdr(), b"\xdd\xff\xff\xff\xff"], 400),
    ("huge declared string", [P, hdr(), b"\x91\xdb\xff\xff\xff\xff"], 400),
    ("deep nesting", [P, hdr(), b"\x91" * 5000], 400),
    ("too many items", [P, hdr(n=100_000), msgpack.packb(["a"] * 100_000)], 413),
    ("item too long", [P, hdr(), msgpack.packb(["x" * 70_000])], 413),
    ("a later protocol version", [b"ZEC2", hdr(), BODY], 400),
    ("header over 16 KiB", [P, hdr(pad="x" * 20_000), BODY], 400),
    ("header with a bin key", [P, msgpack.packb({"id": 7, "n": 1, b"lane": "x"}), BODY], 400),
    ("nested map with an int key", [P, hdr(extra={1: 2}), BODY], 400),
    ("bytes after the header map", [P, hdr() + b"\x00", BODY], 400),
    ("bytes after the body array", [P, hdr(), BODY + b"\x00"], 400),
    ("header nested too deep", [P, b"\x91" * 5000, BODY], 400),
    ("nil id", [P, hdr(id=None), BODY], 400),
    ("nil n", [P, hdr(n=None), BODY], 400),
    ("id as an integral float", [P, hdr(id=7.0), BODY], 400),
]


@pytest.mark.parametrize(("frames", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_status_then_good_one_succeeds(
    raw: zmq.Socket[Any], client: Client, frames: list[bytes], status: int
) -> None:
    raw.send_multipart(frames)
    reply = recv(raw)
    assert reply[0] == P and len(reply) == 3
    header = msgpack.unpackb(reply[1])
    assert header["status"] == status, header
    assert header["error"]  # a clear message, not just a number
    assert reply[2] == b""
    v = client.embed_texts(["still serving"])
    assert v.shape == (1, 384) and np.isfinite(v).all()


def test_error_reply_carries_the_request_id(raw: zmq.Socket[Any]) -> None:
    raw.send_multipart([P, hdr(id=424242, lane="nope"), BODY])
    header = msgpack.unpackb(recv(raw)[1])
    assert header == {"id": 424242, "status": 404, "error": header["error"]}


def test_oversized_frame_disconnects_only_its_sender(
    stack_factory: Any, zctx: zmq.Context[Any]
) -> None:
    stack = stack_factory()
    stack.start_broker("--max-message-bytes", "4096")
    with stack.client(timeout=5) as good:
        good.ping()
        bad = zctx.socket(zmq.DEALER)
        bad.setsockopt(zmq.LINGER, 0)
        bad.connect(stack.frontend)
        bad.send_multipart([P, hdr(), msgpack.packb(["x" * 10_000])])
        assert bad.poll(500) == 0  # libzmq drops the connection: no reply by design
        bad.close()
        assert good.ping()["version"]  # everyone else is unaffected


ERROR_TEXTS: list[tuple[str, list[bytes], str]] = [
    ("ping with extra frames", [P, hdr(op="ping"), b"", b"more"],
     "op 'ping' takes frames [ZEC1, header] or [ZEC1, header, empty body], got 4 frames"),
    ("ping with a body", [P, hdr(op="health"), BODY], "op 'health' takes an empty body frame"),
    ("a later protocol version", [b"ZEC2", hdr(), BODY],
     "unsupported protocol version b'ZEC2': this broker speaks b'ZEC1' only"),
    ("unknown op", [P, hdr(op="explode"), BODY], "unknown op 'explode'; ops are embed, health"),
    # undecodable msgpack names its problem, never "...: " with nothing after the colon
    ("header nested too deep", [P, b"\x91" * 5000, BODY],
     "header is not valid msgpack: StackError: nesting too deep"),
    ("header truncated", [P, hdr()[:-1], BODY],
     "header is not valid msgpack: ValueError: truncated data"),
    ("header byte 0xc1", [P, b"\xc1", BODY],
     "header is not valid msgpack: FormatError: malformed data"),
    ("body nested too deep", [P, hdr(), b"\x91" * 5000],
     "body is not a msgpack array of n=1 items: StackError: nesting too deep"),
    ("body truncated", [P, hdr(), BODY[:-1]],
     "body is not a msgpack array of n=1 items: ValueError: truncated data"),
    ("body byte 0xc1", [P, hdr(), b"\xc1"],
     "body is not a msgpack array of n=1 items: FormatError: malformed data"),
    ("body with a map", [P, hdr(), msgpack.packb([{"a": 1}])],
     "body is not a msgpack array of n=1 items: it holds a msgpack map"),
    ("header over 16 KiB", [P, hdr(pad="x" * 20_000), BODY], "header is 20034 bytes, at most 16384"),
    ("header with an int key", [P, msgpack.packb({"id": 7, "n": 1, 1: 2}), BODY],
     "header map keys must be msgpack str, found a key of type int"),
    ("nil n is missing", [P, hdr(n=None), BODY], "header field 'n' (number of items) is required"),
]


@pytest.mark.parametrize(("frames", "text"), [c[1:] for c in ERROR_TEXTS],
                         ids=[c[0] for c in ERROR_TEXTS])
def test_error_text_names_the_real_problem(
    raw: zmq.Socket[Any], frames: list[bytes], text: str
) -> None:
    raw.send_multipart(frames)
    header = msgpack.unpackb(recv(raw)[1])
    assert header["status"] == 400
    assert header["error"].startswith(text), header["error"]


def test_management_op_with_empty_body_or_none_is_answered(raw: zmq.Socket[Any]) -> None:
    for rid, frames in ((11, [P, hdr(op="ping", id=11)]), (12, [P, hdr(op="ping", id=12), b""])):
        raw.send_multipart(frames)
        header = msgpack.unpackb(recv(raw)[1])
        assert (header["id"], header["status"]) == (rid, 200)


#: Headers refused although they are one whole map with a valid id: the reply keeps that id.
REFUSED_WITH_ID: list[tuple[str, bytes, str]] = [
    ("header over 16 KiB", hdr(pad="x" * 20_000), "header is 20034 bytes, at most 16384"),
    ("header with an int key", msgpack.packb({"id": 7, "n": 1, 1: 2}),
     "header map keys must be msgpack str, found a key of type int"),
    ("header with a bin key", msgpack.packb({"id": 7, "n": 1, b"x": 2}),
     "header map keys must be msgpack str, found a key of type bin"),
    ("bytes after the header map", hdr() + b"\x00", "header is not valid msgpack: ExtraData"),
]


@pytest.mark.parametrize(("header", "text"), [c[1:] for c in REFUSED_WITH_ID],
                         ids=[c[0] for c in REFUSED_WITH_ID])
def test_refused_header_is_answered_with_its_id(
    raw: zmq.Socket[Any], header: bytes, text: str
) -> None:
    raw.send_multipart([P, header, BODY])
    reply = msgpack.unpackb(recv(raw)[1])
    assert reply["status"] == 400 and reply["error"].startswith(text), reply
    assert reply["id"] == 7, reply


def test_nil_optional_fields_mean_absent(raw: zmq.Socket[Any], client: Client) -> None:
    """A JavaScript encoder writes undefined/null as nil: optional fields take their default."""
    nils = {name: None for name in ("op", "lane", "kind", "normalize", "dtype", "deadline_ms",
                                    "input_type")}
    raw.send_multipart([P, hdr(id=31, **nils), msgpack.packb(["nil means absent"])])
    proto, header, body = recv(raw, 15)
    assert proto == P
    h = msgpack.unpackb(header)
    assert (h["id"], h["status"], h["dtype"], h["shape"]) == (31, 200, "f32", [1, 384]), h
    vector = np.frombuffer(body, "<f4")
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-2  # normalize defaulted to true
    assert np.allclose(vector, client.embed_texts(["nil means absent"])[0], atol=1e-2)


def test_protocol_example_runs(shared_stack: Any) -> None:
    """The example at the end of docs/protocol.md, run as written against a real broker."""
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    example = doc[doc.index("## Example (Python, without the SDK)"):]
    code = example[example.index("```python\n") + 10:example.index("```\n", 20)]
    assert "tcp://127.0.0.1:5555" in code
    ns: dict[str, Any] = {}
    exec(compile(code.replace("tcp://127.0.0.1:5555", shared_stack.frontend),
                 "docs/protocol.md", "exec"), ns)
    ns["s"].close()
    vectors = ns["vectors"]
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
    assert ns["failed"] == {} and ns["h"]["id"] == 1

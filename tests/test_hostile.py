"""Property-based hostile input (5 x 100 generated cases): random and mutated frames at the
broker's frontend and backend, random items at the engines. No crash, no hang, a documented
status for every well-framed request, and a valid request right after still succeeds.

Hypothesis generates the cases (``max_examples`` below, derandomised so CI is reproducible);
every receive has a timeout, so a hang fails the test instead of wedging the suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from conftest import Stack, new_stack, recv, tiny_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zembed import protocol as p
from zembed.client import Client
from zembed.engines.image import synthetic_jpeg

DOCUMENTED = set(p.STATUSES)
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=40))
values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12)
HEADER_KEYS = ["op", "lane", "kind", "normalize", "dtype", "deadline_ms", "n", "input_type",
               "dimensions", "timeout_ms", "extra"]
GOOD_VALUES: dict[str, Any] = {"op": "embed", "lane": "text", "kind": "text", "normalize": True,
                               "dtype": "bf16", "deadline_ms": 5000, "input_type": "query",
                               "dimensions": 384}


@st.composite
def well_framed(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    """[protocol, msgpack map with an id, body]: fields good, missing or random."""
    rid = draw(st.integers(1, 2**53))
    header: dict[str, Any] = {"id": rid}
    for key in HEADER_KEYS:
        choice = draw(st.sampled_from(["good", "missing", "random"]))
        if choice == "good" and key in GOOD_VALUES:
            header[key] = GOOD_VALUES[key]
        elif choice == "random":
            header[key] = draw(values)
    items = draw(st.lists(st.one_of(st.text(max_size=300), scalars, values), max_size=6))
    if draw(st.booleans()):
        header["n"] = len(items)
    body = msgpack.packb(items) if draw(st.booleans()) else draw(st.binary(max_size=64))
    return rid, [p.CLIENT_PROTO, msgpack.packb(header), body]


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    """A valid request with bytes flipped, cut or inserted in its header or body."""
    frames = [p.CLIENT_PROTO,
              msgpack.packb({"op": "embed", "id": 5, "lane": "text", "n": 2}),
              msgpack.packb(["a valid sentence", "another one"])]
    which = draw(st.integers(0, 2))
    data = bytearray(frames[which])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    frames[which] = bytes(data)
    return frames


def drain(sock: zmq.Socket[Any], wait_ms: int = 20) -> list[list[bytes]]:
    out = []
    while sock.poll(wait_ms):
        out.append(sock.recv_multipart())
    return out


def assert_names_the_problem(error: str) -> None:
    """An error text says what is wrong: never empty, never "...: " with nothing after it."""
    assert error and not error.rstrip().endswith(":"), repr(error)


def still_serving(client: Client) -> None:
    v = client.embed_texts(["still serving"])
    assert v.shape == (1, 384) and np.isfinite(v).all()


@FUZZ
@given(case=well_framed())
def test_well_framed_requests_get_a_documented_status(
    raw: zmq.Socket[Any], client: Client, case: tuple[int, list[bytes]]
) -> None:
    rid, frames = case
    drain(raw, 0)
    raw.send_multipart(frames)
    reply = recv(raw, 15)
    header = msgpack.unpackb(reply[1])
    assert reply[0] == p.CLIENT_PROTO and header["id"] == rid
    assert header["status"] in DOCUMENTED
    if header["status"] != p.OK:
        assert_names_the_problem(header["error"])
    still_serving(client)


@FUZZ
@given(frames=st.one_of(mutated(), st.lists(st.binary(max_size=80), max_size=5)))
def test_mutated_and_random_frames_never_hurt_the_broker(
    raw: zmq.Socket[Any], client: Client, frames: list[bytes]
) -> None:
    raw.send_multipart(frames) if frames else raw.send(b"")
    for reply in drain(raw, 50):  # an answer is optional (no readable id), a bad one is not
        assert reply[0] == p.CLIENT_PROTO
        header = msgpack.unpackb(reply[1])
        assert header["status"] in DOCUMENTED
        if header["status"] != p.OK:
            assert_names_the_problem(header["error"])
    still_serving(client)


@st.composite
def engine_garbage(draw: st.DrawFn) -> list[bytes]:
    """What a broken or hostile engine could send: any command, any header, any body."""
    cmd = draw(st.sampled_from([p.REPLY, p.HEARTBEAT, p.DISCONNECT, b"\x09", b""]))
    header = (msgpack.packb(draw(values)) if draw(st.booleans())
              else draw(st.binary(max_size=40)))
    proto = p.ENGINE_PROTO if draw(st.integers(0, 4)) else draw(st.binary(max_size=6))
    return [proto, cmd, header, draw(st.binary(max_size=64))][:draw(st.integers(0, 4))]


@FUZZ
@given(frames=engine_garbage())
def test_backend_garbage_is_ignored(shared_stack: Stack, zctx: zmq.Context[Any],
                                    client: Client, frames: list[bytes]) -> None:
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(shared_stack.backend)
    try:
        sock.send_multipart(frames) if frames else sock.send(b"")
        for reply in drain(sock, 20):  # at most: "you are unknown, register first"
            assert reply[0] == p.ENGINE_PROTO and reply[1] == p.DISCONNECT
    finally:
        sock.close()
    still_serving(client)
    assert shared_stack.broker is not None and shared_stack.broker.alive()


@pytest.fixture(scope="module")
def image_stack(tiny: tuple[Path, Path]) -> Iterator[Stack]:
    stack = new_stack()
    try:
        stack.start_broker("--lanes", "text,image")
        stack.start_text()
        stack.start_image(*tiny_args(tiny))
        stack.wait_engines("image", 1)
        stack.wait_engines("text", 1)
        yield stack
    finally:
        stack.close()


JPEG = synthetic_jpeg(64, 48)
image_items = st.one_of(
    st.binary(max_size=200),
    st.just(b""),
    st.integers(1, len(JPEG) - 1).map(lambda cut: JPEG[:cut]),  # truncated
    st.tuples(st.integers(0, len(JPEG) - 1), st.integers(1, 255)).map(
        lambda f: JPEG[:f[0]] + bytes([JPEG[f[0]] ^ f[1]]) + JPEG[f[0] + 1:]),  # flipped byte
    st.text(max_size=50).map(lambda t: "data:image/png;base64," + t),
    st.just(JPEG),
)


@FUZZ
@given(items=st.lists(image_items, min_size=1, max_size=5))
def test_random_image_items_fail_alone(image_stack: Stack, items: list[Any]) -> None:
    with image_stack.client(timeout=15) as c:
        try:
            result = c.embed_images(items)
        except Exception as exc:  # a typed error with a documented status is fine
            assert getattr(exc, "status", None) in DOCUMENTED, repr(exc)
        else:
            assert result.vectors.shape[0] == len(items)
            for i, item in enumerate(items):
                if item == JPEG:
                    assert i not in result.item_errors  # a good image never pays for the rest
        good = c.embed_images([JPEG])
        assert good.vectors.shape[0] == 1 and not good.item_errors


@FUZZ
@given(texts=st.lists(st.text(max_size=2000), min_size=1, max_size=8))
def test_random_texts_embed_or_get_a_status(image_stack: Stack, texts: list[str]) -> None:
    with image_stack.client(timeout=15) as c:
        for lane_call in (c.embed_texts, c.embed_clip_texts):
            try:
                out = lane_call(texts)
            except Exception as exc:
                assert getattr(exc, "status", None) in DOCUMENTED, repr(exc)
            else:
                vectors = getattr(out, "vectors", out)
                assert len(vectors) == len(texts) and np.isfinite(vectors).all()

"""BulkPlan, the I/O-free core of embed_many: sizing, retries, splitting, order, laziness."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from zembed import protocol as p
from zembed.client.bulk import REORDER_FACTOR, BulkPlan, Piece, Sizing
from zembed.client.codec import EmbedResult
from zembed.client.progress import gather
from zembed.errors import (
    BadRequest,
    DeadlineExceeded,
    EngineError,
    EngineUnavailable,
    Overloaded,
    TooLarge,
    UnknownLane,
)

DIM = 3


def info(credits: int = 64, batch: int = 32, engines: int = 1, max_items: int = 256,
         request_bytes: int = 64 << 20) -> dict[str, Any]:
    lane = {"ready": engines > 0, "dim": DIM, "engines": engines,
            "credits_total": credits * engines, "max_request_items": min(max_items, credits)
            if engines else 0, "max_batch": batch if engines else 0}
    return {"limits": {"max_items": max_items, "max_item_bytes": 100, "max_image_bytes": 1000,
                       "max_request_bytes": request_bytes},
            "lanes": {"text": lane, "image": dict(lane)}}


def answer(piece: Piece, errors: dict[int, tuple[int, str]] | None = None) -> EmbedResult:
    """Vectors whose first column is the input's index, as an engine would return them."""
    rows = np.zeros((len(piece.wire), DIM), np.float32)
    rows[:, 0] = [piece.offset + w for w in piece.where]
    return EmbedResult(rows, 0, errors or {})


def run_all(plan: BulkPlan, now: float = 0.0) -> list[Any]:
    out: list[Any] = []
    while not plan.done:
        pieces = plan.take(now)
        for piece in pieces:
            plan.succeeded(piece, answer(piece))
        out.extend(plan.ready())
        now += 1.0
    return out


def test_requests_fill_a_forward_pass_with_the_next_one_waiting() -> None:
    assert Sizing.from_info(info(), "text") == Sizing(32, 64 << 20, 100, 2, DIM)
    two = Sizing.from_info(info(engines=2), "text")
    assert (two.items, two.in_flight) == (32, 4)  # every engine of the lane kept busy
    spread = Sizing.from_info(info(), "text", brokers=3)
    assert (spread.items, spread.in_flight) == (32, 6)  # each broker has its own share
    assert Sizing.from_info(info(), "text", in_flight=3, brokers=3).in_flight == 3
    assert Sizing.from_info(info(credits=16, batch=16), "image").items == 8
    assert Sizing.from_info(info(credits=16, batch=16), "image").item_bytes == 1000
    capped = Sizing.from_info(info(), "text", items=500, in_flight=3)
    assert (capped.items, capped.in_flight) == (64, 3)  # never above what the lane can take
    idle = Sizing.from_info(info(engines=0), "clip-text")
    assert (idle.items, idle.in_flight) == (8, 1)  # provisional until an engine is there
    with pytest.raises(UnknownLane):
        Sizing.from_info({"limits": {}, "lanes": {"text": {}}}, "image")
    with pytest.raises(BadRequest, match="kind must be one of"):
        Sizing.from_info(info(), "audio")


def test_inputs_are_read_only_as_far_as_needed() -> None:
    taken: list[int] = []

    def source() -> Iterator[str]:
        for i in range(10_000):
            taken.append(i)
            yield f"text {i}"

    plan = BulkPlan(source(), "text", Sizing(4, 1 << 20, 100, 2))
    pieces = plan.take(0.0)
    assert [(x.offset, x.size) for x in pieces] == [(0, 4), (4, 4)]
    assert len(taken) <= 9  # two requests' worth (and one look-ahead at most)
    assert plan.take(0.0) == []  # nothing more while both are in flight


def test_vectors_come_back_in_input_order_whatever_the_reply_order() -> None:
    plan = BulkPlan([f"t{i}" for i in range(10)], "text", Sizing(3, 1 << 20, 100, 4))
    a, b, c, d = plan.take(0.0)
    for piece in (d, b, c):
        plan.succeeded(piece, answer(piece))
    assert list(plan.ready()) == []  # the first piece is not back yet
    plan.succeeded(a, answer(a))
    chunks = list(plan.ready())
    assert [ch.offset for ch in chunks] == [0, 3, 6, 9]
    assert np.concatenate([ch.vectors for ch in chunks])[:, 0].tolist() == list(range(10))
    assert plan.done


def test_a_429_waits_for_retry_after_with_jitter_then_goes_again() -> None:
    plan = BulkPlan(["a", "b"], "text", Sizing(1, 1 << 20, 100, 2), rand=lambda: 0.5)
    first, second = plan.take(10.0)
    plan.failed(first, Overloaded("busy", retry_after=0.2), 10.0)
    plan.succeeded(second, answer(second))
    assert plan.wake_at() == pytest.approx(10.0 + 0.2 * 1.25)
    assert plan.take(10.2) == []  # not before its time
    again = plan.take(10.3)
    assert again == [first] and plan.retries == 1
    plan.succeeded(first, answer(first))
    assert [ch.vectors[0, 0] for ch in plan.ready()] == [0.0, 1.0]


def test_429s_are_retried_for_as_long_as_they_come_but_503s_only_for_retry_for() -> None:
    plan = BulkPlan(["a"], "text", Sizing(1, 1 << 20, 100, 1), retry_for_s=5.0,
                    rand=lambda: 0.0)
    now = 0.0
    for _ in range(100):  # 100 refusals over far more than retry_for
        (piece,) = plan.take(now)
        plan.failed(piece, Overloaded("busy", retry_after=0.5), now)
        assert plan.wake_at() == pytest.approx(now + 0.5)  # never more than the broker said
        now = plan.wake_at() or now
    (piece,) = plan.take(now)
    t0 = now
    plan.failed(piece, EngineUnavailable("engine lost"), t0)
    now = plan.wake_at() or now
    (piece,) = plan.take(now)
    plan.failed(piece, DeadlineExceeded("deadline passed"), t0 + 5.0)  # 504: also retried
    now = plan.wake_at() or now
    (piece,) = plan.take(now)
    with pytest.raises(EngineUnavailable, match="still failing after 5 s"):
        plan.failed(piece, EngineUnavailable("no engine"), t0 + 5.1)


@pytest.mark.parametrize("exc", [BadRequest("input_type must be ..."), EngineError("boom")])
def test_errors_that_retrying_cannot_fix_end_the_run(exc: Exception) -> None:
    plan = BulkPlan(["a"], "text", Sizing(1, 1 << 20, 100, 1))
    (piece,) = plan.take(0.0)
    with pytest.raises(type(exc)):
        plan.failed(piece, exc, 0.0)  # type: ignore[arg-type]


def test_a_413_splits_the_request_and_rereads_the_limits() -> None:
    plan = BulkPlan(["a", 7, "b", "c", "d"], "text", Sizing(5, 1 << 20, 100, 1))
    (piece,) = plan.take(0.0)
    assert piece.wire == ["a", "b", "c", "d"] and piece.where == [0, 2, 3, 4]
    plan.failed(piece, TooLarge("4 items exceed the largest engine budget"), 0.0)
    assert plan.wants_info
    plan.resize(Sizing(2, 1 << 20, 100, 3))
    first, second = plan.take(0.0)
    assert (first.offset, first.size, first.wire) == (0, 3, ["a", "b"])
    assert (second.offset, second.size, second.wire, second.where) == (3, 2, ["c", "d"], [0, 1])
    plan.failed(first, TooLarge("still too large"), 0.0)
    halves = plan.take(0.0)
    assert [h.wire for h in halves] == [["a"], ["b"]]
    plan.failed(halves[0], TooLarge("item 0 is too large"), 0.0)  # one input: an item error
    for piece in (halves[1], second):
        plan.succeeded(piece, answer(piece))
    chunks = list(plan.ready())
    rows = np.concatenate([ch.vectors for ch in chunks])
    assert rows[:, 0].tolist() == [0, 0, 2, 3, 4]  # rows 0 and 1 failed: zeros
    errors = {i: e for ch in chunks for i, e in ch.item_errors.items()}
    assert errors[0][0] == p.TOO_LARGE and errors[1][0] == p.BAD_REQUEST
    assert plan.done and plan.items_failed == 2


def test_inputs_the_broker_would_refuse_fail_alone_before_anything_is_sent() -> None:
    items: list[Any] = ["ok", b"bytes", "x" * 101, "é" * 51, "é" * 26, "also ok"]
    plan = BulkPlan(items, "text", Sizing(10, 1 << 20, 100, 1))
    (piece,) = plan.take(0.0)
    # 51 two-byte characters are 102 UTF-8 bytes, over the limit; 26 of them are 52: fine
    assert piece.wire == ["ok", "é" * 26, "also ok"]
    assert piece.where == [0, 4, 5] and sorted(piece.errors) == [1, 2, 3]
    assert plan.take(0.0) == []
    all_bad = BulkPlan([1, 2], "text", Sizing(10, 1 << 20, 100, 1))
    assert all_bad.take(0.0) == []  # nothing to send at all
    (chunk,) = list(all_bad.ready())
    assert chunk.vectors.shape == (2, 0) and sorted(chunk.item_errors) == [0, 1]


def test_engine_item_errors_keep_their_input_index() -> None:
    plan = BulkPlan([b"img0", b"img1", b"img2"], "image", Sizing(3, 1 << 20, 1000, 1, DIM))
    (piece,) = plan.take(0.0)
    plan.succeeded(piece, answer(piece, {1: (400, "not an image")}))
    (chunk,) = list(plan.ready())
    assert chunk.item_errors == {1: (400, "not an image")}


def test_requests_stay_under_the_body_limit() -> None:
    plan = BulkPlan([b"x" * 300] * 7, "image", Sizing(100, 1000, 1000, 10))
    sizes = [len(piece.wire) for piece in plan.take(0.0)]
    assert sizes == [3, 3, 1] and plan.take(0.0) == []


def test_reordering_is_bounded_while_an_early_piece_is_stuck() -> None:
    plan = BulkPlan((f"t{i}" for i in range(1000)), "text", Sizing(1, 1 << 20, 100, 2))
    stuck, *rest = plan.take(0.0)
    for _ in range(50):
        for piece in rest:
            plan.succeeded(piece, answer(piece))
        rest = plan.take(0.0)
        if not rest:
            break
    assert list(plan.ready()) == []
    assert plan._read <= (REORDER_FACTOR + 1) * 2 + 1  # did not read the whole input ahead
    plan.succeeded(stuck, answer(stuck))
    chunks = list(plan.ready()) + run_all(plan)
    assert [ch.offset for ch in chunks] == list(range(1000))


def test_a_run_with_no_inputs_is_done_at_once() -> None:
    plan = BulkPlan([], "text", Sizing(4, 1 << 20, 100, 2))
    assert plan.take(0.0) == [] and plan.done and list(plan.ready()) == []


def test_a_truncated_run_is_as_wide_as_its_dimensions_not_the_lane_dim() -> None:
    """The zero rows of inputs that failed before any reply, and the gathered array, are
    ``dimensions`` wide: the lane's ``dim`` from ``info`` is the full width."""
    sizing = Sizing.from_info(info(), "text", items=2)
    assert sizing.dim == DIM
    plan = BulkPlan([1, 2, "a", "b"], "text", sizing, dimensions=2)
    (piece,) = plan.take(0.0)  # the first two inputs failed here: nothing of them is sent
    assert piece.wire == ["a", "b"]
    plan.succeeded(piece, EmbedResult(np.ones((2, 2), np.float32)))
    chunks = list(plan.ready())
    assert [ch.vectors.shape for ch in chunks] == [(2, 2), (2, 2)]
    out = gather(chunks, 4)
    assert out.shape == (4, 2) and not out[:2].any() and out[2:].all()


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_bad_dimensions_fail_the_run_before_anything_is_sent(bad: Any) -> None:
    with pytest.raises(BadRequest, match="dimensions must be a positive int"):
        BulkPlan(["a"], "text", Sizing(1, 1 << 20, 100, 1, DIM), dimensions=bad)


def test_refuse_unadmitted_raises_a_429_only_while_nothing_is_in() -> None:
    """The gateway's split requests: a full lane refuses the whole run at once; once any part
    is admitted (answered, or still in flight), later 429s are waited out as usual."""
    texts = [f"t{i}" for i in range(100)]
    plan = BulkPlan(texts, "text", Sizing.from_info(info(), "text"), refuse_unadmitted=True)
    first, second = plan.take(0.0)
    plan.failed(first, Overloaded("busy", retry_after=0.2), 0.0)  # the second is in flight
    with pytest.raises(Overloaded):
        plan.failed(second, Overloaded("busy", retry_after=0.2), 0.0)  # nothing got in

    plan = BulkPlan(texts, "text", Sizing.from_info(info(), "text"), refuse_unadmitted=True)
    first, second = plan.take(0.0)
    plan.succeeded(first, answer(first))
    plan.failed(second, Overloaded("busy", retry_after=0.2), 0.0)  # admitted: waits
    assert plan.take(0.1) != [] and not plan.done  # the third goes; the refused one waits
    # Without the option a 429 is never raised, admitted or not.
    plan = BulkPlan(texts, "text", Sizing.from_info(info(), "text"))
    first, second = plan.take(0.0)
    plan.failed(first, Overloaded("busy", retry_after=0.2), 0.0)
    plan.failed(second, Overloaded("busy", retry_after=0.2), 0.0)


def test_sizing_reads_the_lane_it_is_given() -> None:
    lanes = info()
    lanes["lanes"]["e5"] = dict(lanes["lanes"]["text"], max_request_items=8, max_batch=8,
                                credits_total=8)
    assert Sizing.from_info(lanes, "text", lane_name="e5").items == 4
    assert Sizing.from_info(lanes, "text").items == 32


def test_bulk_runs_are_sized_within_the_bulk_share() -> None:
    lanes = info()
    lanes["lanes"]["text"].update(bulk_max_request_items=48, bulk_credits=48)
    assert Sizing.from_info(lanes, "text") == Sizing(16, 64 << 20, 100, 3, DIM)
    assert Sizing.from_info(lanes, "text", bulk=False).items == 32

"""Tickets for refused requests (broker/turns.py): a retry keeps its place, newcomers wait."""

from __future__ import annotations

from typing import Any

import pytest

from zembed.broker.state import BrokerState
from zembed.broker.turns import GRACE_S, JITTER, MAX_TICKETS, RetryLine
from zembed.errors import Overloaded


def ready(credits: int = 64) -> dict[str, Any]:
    return {"lane": "text", "kinds": ["text"], "fingerprint": "fp", "dim": 4,
            "credits": credits, "max_batch": 32, "model": "m", "warmup_items_per_s": 1000.0}


def test_line_order_expiry_and_bounds() -> None:
    line = RetryLine()
    assert not line.must_wait(None, 32, 10, 0.0)  # nobody waiting
    assert line.refused(None, 32, 0.1, 0.0) is None  # asked for no ticket: gets none
    first = line.refused(0, 32, 0.1, 0.0)
    second = line.refused(0, 16, 0.1, 0.0)
    assert first and second and first != second
    assert line.ahead(second) == 32 and line.ahead(first) == 0 and line.ahead(None) == 48
    # Room for 40: a newcomer of 16 would leave 24 < 32 for the oldest ticket: it waits.
    assert line.must_wait(None, 16, 40, 0.01)
    assert line.must_wait(second, 16, 40, 0.01)  # the second ticket waits behind the first
    assert not line.must_wait(None, 8, 40, 0.01)  # 8 leaves 32: both fit
    assert not line.must_wait(first, 32, 40, 0.01)  # the holder of the oldest ticket goes
    line.admitted(first)
    assert line.ahead(second) == 0 and not line.must_wait(second, 16, 16, 0.02)
    # A holder that does not come back by its estimate x jitter + grace loses its place.
    assert line.refused(second, 16, 0.1, 0.02) == second  # refused again: keeps its number
    late = 0.02 + 0.1 * JITTER + GRACE_S + 0.001
    assert not line.must_wait(None, 16, 16, late)
    assert line.view() == {"waiting": 0, "waiting_items": 0, "served": 1, "expired": 1}


def test_line_is_bounded() -> None:
    line = RetryLine()
    for _ in range(MAX_TICKETS):
        assert line.refused(0, 1, 10.0, 0.0) is not None
    assert line.refused(0, 1, 10.0, 0.0) is None


def test_a_refused_request_is_admitted_before_a_newcomer() -> None:
    """The race that starved retrying clients: credits free up, a newcomer asks first."""
    state = BrokerState(("text",))
    state.register(b"a", ready(64), 0.0)
    held = state.dispatch(state.admit("text", 48, 0.0), 48, 60.0, 0.0)
    with pytest.raises(Overloaded) as refused:
        state.admit("text", 32, 0.0, ticket=0)
    ticket = refused.value.ticket
    assert ticket is not None and refused.value.retry_after > 0
    state.complete(b"a", held.token, 0.05)  # 64 free now
    with pytest.raises(Overloaded, match="for requests refused earlier") as newcomer:
        state.admit("text", 48, 0.06, ticket=0)  # would leave 16 < 32 for the ticket
    # The newcomer's estimate counts the 32 items ahead of it.
    assert newcomer.value.retry_after >= 32 / 1000
    state.admit("text", 32, 0.06)  # a small one that leaves room for both still goes
    engine = state.admit("text", 32, 0.07, ticket=ticket)  # the ticket holder goes
    assert engine.identity == b"a"
    lines = state.lane_view("text", 0.07)["retry_lines"]
    assert lines["interactive"]["served"] == 1 and lines["interactive"]["waiting"] == 1


def test_classes_have_lines_of_their_own() -> None:
    """A bulk ticket never holds credits back from interactive requests."""
    state = BrokerState(("text",), bulk_reserve=0.25)
    state.register(b"a", ready(64), 0.0)
    held = state.dispatch(state.admit("text", 40, 0.0, bulk=True), 40, 60.0, 0.0)
    with pytest.raises(Overloaded):
        state.admit("text", 16, 0.0, bulk=True, ticket=0)
    state.complete(b"a", held.token, 0.01)
    state.admit("text", 60, 0.01)  # interactive: the bulk ticket is not in its line

"""Interactive requests ahead of bulk ones, over real processes (broker, MiniLM engine).

The broker keeps a share of each engine's credits (``--bulk-reserve``, 25 % by default) out of
bulk requests' reach, so a bulk flood never turns a search query away while the lane could
serve it. Engines hold their credits deterministically here by being frozen (SIGSTOP).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from conftest import Stack

from zembed.errors import Overloaded


@pytest.fixture
def eight(stack_factory: Callable[[], Stack]) -> Stack:
    """One engine with 8 credits (2 kept from bulk work); 1 s heartbeats survive a freeze."""
    stack = stack_factory()
    stack.start_broker("--heartbeat-interval-ms", "1000")
    stack.engine = stack.start_text("--credits", "8", "--max-batch", "8",
                                    "--heartbeat-interval-ms", "1000")
    stack.wait_engines("text", 1)
    return stack


def test_bulk_cannot_take_the_reserve_and_interactive_can(eight: Stack) -> None:
    engine = eight.engine
    assert engine is not None
    with eight.client() as c:
        info = c.info()["lanes"]["text"]
        assert (info["max_request_items"], info["bulk_max_request_items"],
                info["bulk_credits"]) == (8, 6, 6)
        engine.signal(signal.SIGSTOP)
        try:
            bulk = c.submit("text", "text", [f"doc {i}" for i in range(6)], priority="bulk")
            time.sleep(0.05)
            with pytest.raises(Overloaded, match="kept for interactive") as refused:
                c.embed_texts(["one more document"], input_type="document")  # bulk by default
            assert refused.value.retry_after > 0
            query = c.submit("text", "text", ["a query", "another"])  # interactive: admitted
            time.sleep(0.05)
            with pytest.raises(Overloaded, match="out of credits"):
                c.embed_texts(["a third query"], priority="interactive")
        finally:
            engine.signal(signal.SIGCONT)
        assert c.result(bulk).vectors.shape == (6, 384)
        assert c.result(query).vectors.shape == (2, 384)
        classes = c.stats()["lanes"]["text"]["classes"]
        assert classes == {"bulk": {"admitted": 1, "refused": 1},
                           "interactive": {"admitted": 1, "refused": 1}}


def test_queries_are_not_refused_while_embed_many_floods_the_lane(shared_stack: Stack) -> None:
    """The headline case: a re-index running, and search queries still get in every time."""
    texts = [f"catalogue entry {i}: a {'red' if i % 3 else 'blue'} item" for i in range(1500)]
    out: dict[str, object] = {}

    def index() -> None:
        with shared_stack.client(timeout=120) as bulk_client:
            out["vectors"] = bulk_client.embed_many(texts)

    worker = threading.Thread(target=index)
    worker.start()
    refused = answered = 0
    try:
        with shared_stack.client(timeout=10) as c:  # retries=0: every refusal shows
            time.sleep(0.5)  # the bulk run is under way
            while worker.is_alive() and answered + refused < 60:
                try:
                    assert c.embed_texts(["red running shoes"]).shape == (1, 384)
                    answered += 1
                except Overloaded:
                    refused += 1
                time.sleep(0.02)
    finally:
        worker.join(120)
    assert not worker.is_alive()
    vectors = out["vectors"]
    assert isinstance(vectors, np.ndarray) and vectors.shape == (1500, 384)
    assert refused == 0, f"{refused} of {answered + refused} queries refused during bulk work"
    assert answered >= 10, "the bulk run ended before the queries could be measured"

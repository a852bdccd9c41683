"""``zembed bench`` against live brokers: bounded runs whose counts add up; batching exactness."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import numpy as np
from conftest import Stack

from zembed.cache.bf16 import from_bf16
from zembed.tools.bench import Bench, BenchSpec
from zembed.tools.inputs import InputSource


def test_closed_loop_counts_add_up(shared_stack: Stack) -> None:
    spec = BenchSpec(items=2, concurrency=2, window=2, duration_s=1.5, repeat=0.5)
    s = Bench(shared_stack.frontend, spec, progress=False).run().summary()
    assert s["sent"] == s["answered"] == s["ok"] + s["rejected_429"] + s["errors"]
    assert s["ok"] > 0 and s["errors"] == 0
    assert s["items_per_s"] > 0 and s["latency_ms"]["p50"] <= s["latency_ms"]["max"]


def test_open_loop_overload_is_rejected_and_counted(
    stack_factory: Callable[[], Stack],
) -> None:
    stack = stack_factory()
    stack.start_broker()
    stack.start_text("--credits", "4", "--max-batch", "4")
    stack.wait_engines("text", 1)
    spec = BenchSpec(items=4, rate=300, duration_s=1.5, requests=400)
    s = Bench(stack.frontend, spec, progress=False).run().summary()
    assert s["sent"] == s["answered"] == s["ok"] + s["rejected_429"] + s["errors"]
    assert s["sent"] <= 400 and s["errors"] == 0
    assert s["rejected_429"] > 0 and s["ok"] > 0  # 1200 items/s asked of a ~100 items/s lane
    assert s["time_to_429_ms"]["p50"] > 0


def test_cli_bench_json(shared_stack: Stack) -> None:
    out = subprocess.run([sys.executable, "-m", "zembed", "bench", "--json", "--duration-s",
                          "1", "--requests", "30", "--concurrency", "2", "--endpoint",
                          shared_stack.frontend], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    served = json.loads(out.stdout)["served"]
    assert served["sent"] <= 30 and served["sent"] == served["ok"]


def test_inputs_are_unique_or_repeated_as_asked() -> None:
    unique = InputSource("text", repeat=0.0).take(500)
    assert len(set(unique)) == 500
    repeated = InputSource("text", repeat=1.0, pool=10).take(500)
    assert len(set(repeated)) <= 10
    images = InputSource("image", repeat=0.0, image_size=(64, 48)).take(20)
    assert len(set(images)) == 20 and all(i[:2] == b"\xff\xd8" for i in images)


def test_batched_equals_alone_to_bf16_rounding(stack_factory: Callable[[], Stack]) -> None:
    """fp32 compute: an item's vector does not depend on what it was batched with."""
    stack = stack_factory()
    stack.start_broker()
    stack.start_text("--dtype", "fp32")
    stack.wait_engines("text", 1)
    texts = InputSource("text", seed=5).take(24)
    with stack.client(timeout=30) as c:
        batched = c.embed("text", "text", texts, dtype="bf16").vectors
        alone = np.vstack([c.embed("text", "text", [t], dtype="bf16").vectors for t in texts])
    a, b = from_bf16(batched), from_bf16(alone)
    # At most one BF16 step apart (2^-7 relative): the rounding of a ~1e-7 difference.
    assert np.allclose(a, b, rtol=2.0**-7, atol=1e-6)
    assert (batched == alone).mean() > 0.95  # and almost always the very same bits


def test_raw_transport_round_trip_uses_the_same_load_generator() -> None:
    from zembed.tools.raw import zmq_round_trip

    out = zmq_round_trip("text", items=2, in_flight=4, seconds=0.5)
    assert out["round_trips_per_s"] > 0 and out["p50_ms"] > 0


def test_repeat_pool_is_the_same_across_runs_and_fresh_items_are_not() -> None:
    a, b = InputSource("text", repeat=1.0, pool=5), InputSource("text", repeat=1.0, pool=5)
    assert a.pool == b.pool  # one run warms the cache for the next
    assert set(InputSource("text").take(5)).isdisjoint(InputSource("text").take(5))

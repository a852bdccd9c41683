"""``zembed bench`` against live brokers: bounded runs whose counts add up; batching exactness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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


def test_raw_measures_the_model_the_engine_serves(stack_factory: Callable[[], Stack],
                                                  tiny: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    """An image engine on --random-weights: ``bench --raw`` measures those random weights (the
    config names weights nobody has here), or says in one line what to pass."""
    stack = stack_factory()
    stack.start_broker("--lanes", "image")
    stack.start_image("--model", "zembed-tiny", "--model-config", str(tiny[0]),
                      "--random-weights", "--dtype", "fp32", "--credits", "8")
    stack.wait_engines("image", 1)
    bench = [sys.executable, "-m", "zembed", "bench", "--kind", "image", "--raw", "--json",
             "--duration-s", "1", "--requests", "10", "--concurrency", "1", "--items", "2",
             "--endpoint", stack.frontend]
    env = dict(os.environ, ZEMBED_CONFIG="")

    # Without the engine's model config the architecture is unknown here: one line, no trace.
    out = subprocess.run(bench, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "zembed-tiny with random weights" in errors[0] and "pass --config" in errors[0]

    # With it (and the config's default weights, ViT-B-32 'openai', which are not here and are
    # not served): the served model is what gets measured.
    config = tmp_path / "zembed.toml"
    config.write_text(f'[image]\nmodel_config = "{tiny[0]}"\n')
    out = subprocess.run([*bench, "--config", str(config)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    raw = json.loads(out.stdout)["raw"]["image"]
    assert raw["forward_items_per_s@2"] > 0 and raw["decode_preprocess_per_s"] > 0
    assert "model_mismatch" not in raw  # same fingerprint as the serving engine


def test_raw_engine_config_takes_the_served_model_over_the_config_file(tmp_path: Path) -> None:
    from zembed.tools.raw import engine_config

    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"not read here")
    config = tmp_path / "zembed.toml"
    config.write_text(f'[image]\nmodel = "ViT-B-32"\npretrained = "{checkpoint}"\n'
                      'dtype = "bf16"\nthreads = 3\n')
    served = {"model": "ViT-B-16", "random_weights": True, "pretrained": "random",
              "dtype": "fp32", "device": "cpu"}
    cfg = engine_config("image", str(config), served)
    assert (cfg.model, cfg.random_weights, cfg.dtype, cfg.threads) == \
        ("ViT-B-16", True, "fp32", 3)  # threads: this machine's, from the file
    # A checkpoint is announced by file name: the file's path is used when the names match,
    # else the announcement is taken as an open_clip tag.
    same = engine_config("image", str(config), {**served, "random_weights": False,
                                                 "pretrained": "weights.pt"})
    assert same.pretrained == str(checkpoint) and not same.random_weights
    tag = engine_config("image", str(config), {**served, "random_weights": False,
                                                "pretrained": "laion2b_s34b_b79k"})
    assert tag.pretrained == "laion2b_s34b_b79k"
    assert engine_config("image", str(config), None).model == "ViT-B-32"  # no engine to ask


def test_raw_text_measures_the_bundled_default_model_its_engine_announces(
    shared_stack: Stack,
) -> None:
    """The default engine announces its bundled model by hub name: raw loads the bundle."""
    from zembed.engines.text import resolve_model_dir
    from zembed.tools.raw import BUNDLED_TEXT_MODEL, engine_config

    assert resolve_model_dir("")[0] == BUNDLED_TEXT_MODEL
    assert engine_config("text", None, {"model": BUNDLED_TEXT_MODEL, "dtype": "fp32"}).model == ""
    assert engine_config("text", None, {"model": "/models/other"}).model == "/models/other"
    out = subprocess.run(
        [sys.executable, "-m", "zembed", "bench", "--endpoint", shared_stack.frontend,
         "--stats-endpoint", shared_stack.stats, "--kind", "text", "--duration-s", "1",
         "--requests", "20", "--concurrency", "1", "--raw", "--json"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    raw = json.loads(out.stdout)["raw"]["text"]
    assert raw["forward_items_per_s@1"] > 0 and "model_mismatch" not in raw

"""embed_many against real processes: a lane short of credits, an engine killed mid-run, bad
images; and the commands built on it (``embed --file``, ``cache warm`` for images).

Every good input must come back once, in input order, with the vector a plain embed call
gives for it; every bad one must be reported with its index, never stop the run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Stack, both_lanes
from images import jpeg, png, write

from zembed import protocol as p
from zembed.client import AsyncClient, Client
from zembed.client.bulk import Sizing

pytestmark = pytest.mark.slow

ZEMBED = [sys.executable, "-m", "zembed"]


def texts(n: int, tag: str) -> list[str]:
    return [f"{tag} sentence {i} about {'searching ' * (i % 7)}documents" for i in range(n)]


def reference(client: Client, items: list[str], size: int | None = None) -> np.ndarray:
    """embed_texts over the same inputs, in requests of the size embed_many used (``size``,
    or what it sizes from ``info``): the batch a vector was computed in shows in its last bits
    where batch invariance does not hold."""
    size = size or Sizing.from_info(client.info(), "text").items
    return np.concatenate([client.embed_texts(items[i:i + size])
                           for i in range(0, len(items), size)])


def assert_same_rows(client: Client, got: np.ndarray, want: np.ndarray) -> None:
    """Every row, in order: bit for bit where the engine's batch invariance holds on this
    machine (stats: ``batch_invariant_holds``), else equal to rounding, for embed_many's
    requests share forward passes as the engine batches them."""
    engine = client.stats()["lanes"]["text"]["engines"][0]
    if engine["batch_invariant_holds"]:
        assert np.array_equal(got, want)
    cosine = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(
        want, axis=1)
    assert (cosine > 0.9999).all()


def lane_count(client: Client, lane: str, status: int) -> int:
    return int(client.stats()["lanes"][lane]["requests"][str(status)])


def test_a_lane_short_of_credits_only_slows_embed_many_down(
        stack_factory: Callable[[], Stack]) -> None:
    s = stack_factory()
    s.start_broker()
    s.start_text("--credits", "8", "--max-batch", "4")
    s.wait_engines("text", 1)
    items = texts(300, "credits")
    with s.client(timeout=20, retries=None) as c:
        assert c.info()["lanes"]["text"]["max_request_items"] == 8
        # 6 requests of 4 in flight against 8 credits: most of them are refused at first.
        got = c.embed_many(items, batch_size=4, in_flight=6)
        refused = lane_count(c, "text", p.OVERLOADED)

        async def run_async() -> np.ndarray:
            async with AsyncClient(s.frontend, timeout=20) as ac:
                return await ac.embed_many(iter(items), batch_size=4, in_flight=6)

        got_async = asyncio.run(run_async())
        want = reference(c, items, 4)
    assert refused > 20  # the run really went through 429s
    assert got.shape == (300, 384) and got.dtype == np.float32
    assert np.array_equal(got, want)  # every row, in order, bit for bit
    assert np.array_equal(got_async, want)


def test_an_engine_killed_mid_run_costs_time_not_items(
        stack_factory: Callable[[], Stack]) -> None:
    s = stack_factory()
    s.start_broker()
    engine = s.start_text()
    s.wait_engines("text", 1)
    items = texts(400, "killed")
    seen: list[int] = []
    parts: list[np.ndarray] = []
    with s.client(timeout=10, retries=None) as c:
        for chunk in c.embed_many_iter(items):
            seen.append(chunk.offset)
            parts.append(chunk.vectors)
            assert not chunk.item_errors
            if engine is not None:  # after the first chunk: kill it, start another
                engine.popen.send_signal(signal.SIGKILL)
                engine.popen.wait(10)
                engine = None
                s.start_text()
        lost = lane_count(c, "text", p.UNAVAILABLE)
        want = reference(c, items)
        got = np.concatenate(parts)
        assert lost > 0  # the run saw the engine go (503s), and went on
        assert seen == sorted(set(seen)) and got.shape == (400, 384)
        assert_same_rows(c, got, want)


# -- the image lane ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lanes(tiny: tuple[Path, Path]) -> Iterator[Stack]:
    """Both lanes, with a memory cache (for `cache warm`), and a tiny image engine."""
    with both_lanes(tiny, "--cache", "memory") as stack:
        yield stack


def test_bad_images_are_reported_by_index_and_never_stop_the_run(lanes: Stack,
                                                                  tmp_path: Path) -> None:
    images: list[Any] = [jpeg(i) for i in range(30)]
    images[5] = b"this is not an image"
    images[17] = str(tmp_path / "missing.jpg")  # unreadable here, on the client
    images[22] = write(tmp_path / "ok.png", png(22))  # a path that is fine
    errors: dict[int, tuple[int, str]] = {}
    with lanes.client(timeout=20, retries=None) as c:
        got = c.embed_many(images, kind="image",
                           on_item_error=lambda i, st, msg: errors.setdefault(i, (st, msg)))
        good = [i for i in range(30) if i not in (5, 17)]
        one_by_one = np.concatenate([c.embed_images([images[i]]).vectors for i in good])
    assert sorted(errors) == [5, 17]
    assert errors[5][0] == p.BAD_REQUEST and "missing.jpg" in errors[17][1]
    assert got.shape == (30, 32)
    assert not got[[5, 17]].any()  # failed rows are zeros
    np.testing.assert_allclose(got[good], one_by_one, atol=1e-5)  # fp32 engine: batch noise only


def test_clip_texts_through_embed_many(lanes: Stack) -> None:
    items = texts(40, "clip")
    with lanes.client(timeout=20, retries=None) as c:
        got = c.embed_many(items, kind="clip-text", normalize=False)
        want = np.concatenate([c.embed_clip_texts(items[i:i + 4], normalize=False)
                               for i in range(0, 40, 4)])
    assert got.shape == (40, 32)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cache_warm_fills_the_cache_for_images(lanes: Stack, tmp_path: Path) -> None:
    # 40 images (more than the lane's 16 credits: one request of 32 used to be a 413), sent
    # with --no-normalize so that no other test's request meets these cache entries.
    paths = [str(write(tmp_path / f"w{i}.jpg", jpeg(100 + i))) for i in range(40)]
    listing = tmp_path / "photos.txt"
    listing.write_text("\n".join(paths) + "\n\n")  # a blank line is skipped
    cmd = [*ZEMBED, "cache", "warm", str(listing), "--kind", "image", "--no-normalize",
           "--endpoint", lanes.frontend]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout) | {"seconds": 0} == {
        "items": 40, "already_cached": 0, "failed": 0, "seconds": 0}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert json.loads(again.stdout)["already_cached"] == 40


def test_embed_file_writes_every_line_and_names_the_bad_ones(lanes: Stack,
                                                             tmp_path: Path) -> None:
    paths = [str(write(tmp_path / f"f{i}.jpg", jpeg(200 + i))) for i in range(12)]
    paths[3] = str(tmp_path / "gone.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths))  # no line break after the last line
    out = tmp_path / "vectors.npy"
    run = subprocess.run([*ZEMBED, "embed", "image", "--file", str(listing), "--out", str(out),
                          "--endpoint", lanes.frontend], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1  # an input failed: the vectors are written, and it says so
    assert "input 3 (line 4) failed" in run.stderr
    summary = json.loads(run.stderr.strip().splitlines()[-1])
    assert summary["items"] == 12 and summary["failed"] == 1
    vectors = np.load(out)
    assert vectors.shape == (12, 32) and not vectors[3].any()
    assert (np.abs(vectors[[0, 11]]).sum(axis=1) > 0).all()
    with lanes.client(timeout=20) as c:
        want = c.embed_images([Path(paths[11]).read_bytes()]).vectors[0]
    np.testing.assert_allclose(vectors[11], want, atol=1e-2)  # may be a bf16 cache hit


def test_info_announces_the_limits_and_each_lane(shared_stack: Stack) -> None:
    with shared_stack.client() as c:
        info = c.info()
    assert info["limits"]["max_items"] == 256 and info["limits"]["max_request_bytes"] > 0
    lane = info["lanes"]["text"]
    assert lane["ready"] and lane["kinds"] == ["text"] and lane["dim"] == 384
    assert lane["model"].endswith("all-MiniLM-L6-v2") and set(lane["fingerprints"]) == {"text"}
    assert (lane["engines"], lane["credits_total"], lane["max_request_items"],
            lane["max_batch"]) == (1, 64, 64, 32)
    out = subprocess.run([*ZEMBED, "info", "--endpoint", shared_stack.frontend],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["lanes"]["text"]["dim"] == 384


def test_info_of_a_lane_without_engines(stack_factory: Callable[[], Stack]) -> None:
    s = stack_factory()
    s.start_broker("--lanes", "text,image")
    with s.client(timeout=5) as c:
        for _ in range(100):  # the broker may still be binding
            try:
                info = c.info(timeout=0.5)
                break
            except Exception:
                continue
        else:
            pytest.fail("the broker never answered info")
    image = info["lanes"]["image"]
    assert image["kinds"] == ["clip-text", "image"]
    assert (image["ready"], image["dim"], image["max_request_items"]) == (False, None, 0)

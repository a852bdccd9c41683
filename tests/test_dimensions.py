"""``dimensions`` (Matryoshka truncation) and named prompts through a real broker, a real text
engine (the bundled MiniLM) and a real Redis the tests start: the engine's prefix is the
renormalised prefix of the full vector, each width has cache entries of its own, and a lane
that does not truncate says so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import RedisServer, Stack, hit_when_written, new_stack

from zembed.client import AsyncClient, BadRequest, Client
from zembed.client.bulk import EmbedChunk

DIM = 384
ZEMBED = [sys.executable, "-m", "zembed"]


def fresh(n: int) -> list[str]:
    """Inputs no earlier test has cached."""
    tag = uuid.uuid4().hex[:8]
    return [f"sentence {i} about trail shoes {tag}" for i in range(n)]


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)  # type: ignore[no-any-return]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(unit(a) * unit(b), axis=1)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def matryoshka(module_redis: RedisServer) -> Iterator[Stack]:
    """A broker on a Redis of its own, with a text engine that truncates (``--dimensions on``)."""
    stack = new_stack()
    try:
        stack.start_broker("--cache", module_redis.url, "--heartbeat-interval-ms", "1000")
        stack.engine = stack.start_text("--dimensions", "on", "--heartbeat-interval-ms", "1000")
        stack.wait_engines("text", 1)
        yield stack
    finally:
        stack.close()


@pytest.fixture
def client(matryoshka: Stack) -> Iterator[Client]:
    with matryoshka.client(timeout=20) as c:
        yield c


def test_a_prefix_is_the_renormalised_start_of_the_full_vector_and_cached_apart(
        client: Client, module_redis: RedisServer) -> None:
    texts = fresh(5)
    short = client.embed("text", "text", texts, dimensions=128)
    assert short.vectors.shape == (5, 128) and short.cached == 0
    np.testing.assert_allclose(np.linalg.norm(short.vectors, axis=1), 1.0, atol=1e-2)
    # The same request again: every item from the 128-wide entries, bit for bit.
    again = hit_when_written(lambda: client.embed("text", "text", texts, dimensions=128))
    assert again.cached_items == list(range(5))
    assert again.vectors.tobytes() == short.vectors.tobytes()
    # The full width after it is not served from those entries: computed, 384 wide.
    full = client.embed("text", "text", texts)
    assert full.vectors.shape == (5, DIM) and full.cached == 0
    assert (cosines(short.vectors, full.vectors[:, :128]) > 0.999).all()
    np.testing.assert_allclose(short.vectors, unit(full.vectors[:, :128]), atol=1e-2)
    # Asking for the full dim is the request without dimensions: its entries, its vectors.
    same = hit_when_written(lambda: client.embed("text", "text", texts, dimensions=DIM))
    assert same.vectors.tobytes() == full.vectors.tobytes()
    keys = {k.decode() for k in module_redis.client().scan_iter(match="*:n@128:-:*")}
    assert len(keys) >= 5


def test_raw_and_bf16_prefixes(client: Client) -> None:
    texts = fresh(3)
    raw = client.embed("text", "text", texts, normalize=False, dimensions=64).vectors
    full_raw = client.embed("text", "text", texts, normalize=False).vectors
    assert raw.shape == (3, 64)
    # The prefix of the unnormalised output, in direction (a model whose own pipeline ends in
    # Normalize, like this one, normalises every output whatever the request says).
    assert (cosines(raw, full_raw[:, :64]) > 0.999).all()
    words = client.embed_texts(texts, dimensions=64, dtype="bf16")
    assert words.shape == (3, 64) and words.dtype == np.uint16


def test_bulk_and_cli_take_dimensions(matryoshka: Stack, client: Client,
                                      tmp_path: Any) -> None:
    texts = fresh(40)
    vectors = client.embed_many(texts, dimensions=32, batch_size=8)
    assert vectors.shape == (40, 32)
    chunks: list[EmbedChunk] = list(client.embed_many_iter(texts[:10], dimensions=32,
                                                           batch_size=4))
    assert all(ch.vectors.shape[1] == 32 for ch in chunks)
    run = subprocess.run([*ZEMBED, "embed", "text", "--dimensions", "16", "--json",
                          "--endpoint", matryoshka.frontend, "red running shoes"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    assert row["dim"] == 16 and len(row["vector"]) == 16
    corpus, out = tmp_path / "corpus.txt", tmp_path / "vectors.npy"
    corpus.write_text("\n".join(fresh(6)) + "\n")
    run = subprocess.run([*ZEMBED, "embed", "text", "--file", str(corpus), "--out", str(out),
                          "--dimensions", "48", "--endpoint", matryoshka.frontend],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert np.load(out).shape == (6, 48)


def test_the_async_client_takes_dimensions(matryoshka: Stack, client: Client) -> None:
    texts = fresh(12)

    async def main() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        async with AsyncClient(matryoshka.frontend, timeout=20) as ac:
            one = await ac.embed_texts(texts[:2], dimensions=96)
            many = await ac.embed_many(texts, dimensions=96, batch_size=4)
            chunks = [ch.vectors async for ch in ac.embed_many_iter(texts[:3], dimensions=96)]
            return one, many, np.concatenate(chunks)

    one, many, iterated = asyncio.run(main())
    assert one.shape == (2, 96) and many.shape == (12, 96) and iterated.shape == (3, 96)
    sync = client.embed_texts(texts, dimensions=96)
    assert (cosines(many, sync) > 0.999).all()


def test_dimensions_the_model_does_not_have_and_unknown_prompts_are_400(
        client: Client) -> None:
    with pytest.raises(BadRequest, match=f"dimensions must be at most {DIM}"):
        client.embed_texts(["x"], dimensions=DIM + 1)
    with pytest.raises(BadRequest, match="unknown prompt 'clustering' for lane 'text'"):
        client.embed_texts(["x"], input_type="clustering")
    with pytest.raises(BadRequest, match="input_type must be a prompt name"):
        client.embed_texts(["x"], input_type="two words")
    assert client.embed_texts(["x"], input_type="query").shape == (1, DIM)  # always accepted


def test_info_says_what_a_request_may_ask(matryoshka: Stack, client: Client) -> None:
    lane = client.info()["lanes"]["text"]
    assert lane["dimensions"] is True and lane["dim"] == DIM
    assert isinstance(lane["prompts"], list) and "default_prompt" in lane
    engine = client.stats()["lanes"]["text"]["engines"][0]
    assert engine["dimensions"] is True


def test_a_lane_that_does_not_truncate_answers_400(
        stack_factory: Callable[[], Stack]) -> None:
    s = stack_factory()
    s.start_broker("--heartbeat-interval-ms", "1000")
    s.start_text("--dimensions", "off", "--heartbeat-interval-ms", "1000")
    s.wait_engines("text", 1)
    with s.client(timeout=20) as c:
        with pytest.raises(BadRequest, match=r"does not allow dimensions.*--dimensions on"):
            c.embed_texts(["x"], dimensions=128)
        with pytest.raises(BadRequest, match="does not allow dimensions"):
            c.embed_many(["x", "y"], dimensions=128)
        assert c.embed_texts(["x"], dimensions=DIM).shape == (1, DIM)  # the full dim is fine
        assert c.info()["lanes"]["text"]["dimensions"] is False

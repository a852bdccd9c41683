"""End to end through a real broker and a real all-MiniLM-L6-v2 engine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import Stack

from zembed.cache.bf16 import from_bf16
from zembed.client import AsyncClient, Client

SENTENCES = [
    "How do I reset my password?",
    "I forgot my login credentials and cannot sign in.",
    "Red running shoes for women",
    "The quarterly report is due on Friday.",
]


def test_shape_and_norms(client: Client) -> None:
    v = client.embed_texts(SENTENCES)
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=0.01)
    # all-MiniLM-L6-v2's pipeline ends with Normalize (modules.json): sentence-transformers
    # returns unit vectors without being asked, and so does zembed for normalize=false (a model
    # without it returns raw vectors: tests/test_fidelity.py).
    raw = client.embed_texts(SENTENCES, normalize=False)
    norms = np.linalg.norm(raw, axis=1)
    assert np.allclose(norms, 1.0, atol=0.01)
    assert np.allclose(np.sum(v * raw, axis=1) / norms, 1.0, atol=0.01)


def test_deterministic_and_batch_independent(client: Client) -> None:
    a = client.embed_texts(SENTENCES)
    b = client.embed_texts(SENTENCES)
    assert np.array_equal(a, b)
    single = np.vstack([client.embed_texts([s]) for s in SENTENCES])
    # batch_invariant (the default): alone or together, the same bits where the engine measured
    # at warm-up that this machine's kernels allow it (stats: batch_invariant_holds); the same
    # vectors to rounding everywhere.
    (engine,) = client.stats()["lanes"]["text"]["engines"]
    if engine["batch_invariant_holds"]:
        assert np.array_equal(single, a)
    cosine = np.sum(single * a, axis=1) / np.linalg.norm(single, axis=1) / np.linalg.norm(a, axis=1)
    assert (cosine > 0.9999).all()


def test_related_sentences_score_higher(client: Client) -> None:
    v = client.embed_texts(SENTENCES)
    sims = v @ v.T
    assert sims[0, 1] > 0.5
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[0, 3] + 0.3


def test_bf16_wire_is_the_same_vector(client: Client) -> None:
    f32 = client.embed_texts(SENTENCES)
    words = client.embed_texts(SENTENCES, dtype="bf16")
    assert words.dtype == np.dtype("<u2") and words.shape == (4, 384)
    assert np.array_equal(from_bf16(words), f32)  # f32 on the wire is widened bf16, exactly


def test_unicode_empty_and_long_texts(client: Client) -> None:
    texts = ["", "ünïcödé ✓ 漢字 🙂", "word " * 2000]  # the last is truncated to 256 tokens
    v = client.embed_texts(texts)
    assert v.shape == (3, 384) and np.isfinite(v).all()


def test_pipelined_requests_match_their_ids(client: Client) -> None:
    pending = [client.submit("text", "text", [s]) for s in SENTENCES * 5]
    got = [client.result(pnd).vectors[0] for pnd in reversed(pending)]
    want = client.embed_texts(SENTENCES)
    for i, vec in enumerate(reversed(got)):
        assert np.allclose(vec, want[i % 4], atol=0.02)


def test_async_client_many_in_flight(shared_stack: Stack) -> None:
    async def main() -> list[np.ndarray]:
        async with AsyncClient(shared_stack.frontend, timeout=20) as c:
            return await asyncio.gather(*(c.embed_texts([s]) for s in SENTENCES * 16))

    results = asyncio.run(main())
    assert len(results) == 64
    for i, v in enumerate(results):
        assert v.shape == (1, 384)
        assert np.allclose(v, results[i % 4], atol=0.02)


def test_management_ops(client: Client) -> None:
    assert client.ping()["version"]
    assert client.health()["status"] == "ok"
    ready = client.ready()
    assert ready["ready"] is True and ready["missing"] == []
    before = client.stats()["lanes"]["text"]["requests"]["200"]
    client.embed_texts(["one more"])
    stats = client.stats()
    lane = stats["lanes"]["text"]
    assert lane["requests"]["200"] == before + 1
    assert lane["engines"][0]["dim"] == 384 and lane["credits_free"] == lane["credits_total"]
    assert lane["engines"][0]["fingerprint"].startswith("text-")


@pytest.mark.parametrize("lane", ["image"])
def test_unserved_lane_is_404(client: Client, lane: str) -> None:
    from zembed.errors import UnknownLane

    with pytest.raises(UnknownLane):
        client.embed(lane, "image", [b"x"])

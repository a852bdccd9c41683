"""Served vectors are sentence-transformers' vectors, for every pipeline shape zembed runs.

Tiny models with random weights, saved by sentence-transformers itself (tests/stmodels.py): one
per pooling mode, with a Dense head, with Normalize, with prompts (and one that pools without
them), and a decoder with last-token pooling and left padding. Each is served by its own text
engine on its own lane behind one real broker; a request of mixed lengths (one past the
model's max_seq_length) must come back as ``SentenceTransformer(folder).encode`` returns it:
same dimension, cosine >= 0.9999 in float32, the same norm (to BF16 rounding) where the model
does not normalise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import stmodels as sm
from conftest import Stack, new_stack

from zembed.client import Client


@dataclass(frozen=True)
class Case:
    """One tiny model: how it is built, and engine flags beyond the defaults."""

    lane: str
    decoder: bool = False
    tail: tuple[str, ...] = ()
    build: tuple[tuple[str, Any], ...] = ()
    flags: tuple[str, ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.build)


CASES = [
    Case("mean", build=(("pooling", "mean"), ("prompts", sm.PROMPTS))),
    Case("cls-normalize", tail=("Normalize",), build=(("pooling", "cls"),)),
    Case("max-dense", build=(("pooling", "max"), ("dense", 16))),
    Case("sqrt-layernorm", tail=("LayerNorm",), build=(("pooling", "mean_sqrt_len_tokens"),)),
    # INSTRUCTOR-style: the default prompt applies, and pooling leaves its tokens out.
    Case("weighted-noprompt", build=(("pooling", "weightedmean"), ("include_prompt", False),
                                     ("prompts", sm.PROMPTS), ("default_prompt", "query"))),
    Case("multi", build=(("pooling", ("cls", "max", "mean")),)),
    # Qwen3-Embedding-style: causal, left padding, last token, a query prompt, Normalize; one
    # pass padded to its longest input, so the left padding is exercised.
    Case("decoder", decoder=True, tail=("Normalize",),
         build=(("pooling", "lasttoken"), ("prompts", {"query": "Instruct: find shoes\nQuery: "})),
         flags=("--no-batch-invariant",)),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("st-models")
    encoder, decoder = sm.encoder(root / "encoder"), sm.decoder(root / "decoder")
    folders = {c.lane: sm.st_model(decoder if c.decoder else encoder, root / c.lane, *c.tail,
                                   **c.kwargs()) for c in CASES}
    stack = new_stack()
    try:
        stack.start_broker("--lanes", ",".join(folders), "--heartbeat-interval-ms", "1000")
        for case in CASES:
            stack.start_text("--lane", case.lane, "--model", str(folders[case.lane]),
                             "--dtype", "fp32", "--heartbeat-interval-ms", "1000", *case.flags)
        for case in CASES:
            stack.wait_engines(case.lane, 1, timeout=240)
        yield stack, folders
    finally:
        stack.close()


def served_vectors(client: Client, lane: str, input_type: str | None = None) -> Any:
    return client.embed(lane, "text", sm.TEXTS, normalize=False, input_type=input_type).vectors


def assert_faithful(ours: Any, ref: Any, unit: bool) -> None:
    assert ours.shape == ref.shape
    cosine = np.sum(ours * ref, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.9999, cosine
    norms = np.linalg.norm(ours, axis=1)
    assert np.allclose(norms, np.linalg.norm(ref, axis=1), rtol=0.01)  # BF16 on the wire
    assert np.allclose(norms, 1.0, atol=0.01) == unit


@pytest.mark.parametrize("case", CASES, ids=[c.lane for c in CASES])
def test_served_vectors_match_sentence_transformers(served: tuple[Stack, dict[str, Path]],
                                                    case: Case) -> None:
    stack, folders = served
    with stack.client(timeout=30) as client:
        ours = served_vectors(client, case.lane)
    assert_faithful(ours, sm.reference(folders[case.lane], sm.TEXTS), unit="Normalize" in case.tail)


@pytest.mark.parametrize(("lane", "input_type", "prompt_name", "document"), [
    ("mean", "query", "query", False),
    # No "document" prompt (e5-style query/passage): the "passage" prompt, as encode_document
    # documents its order (document, passage, corpus). sentence-transformers 6.2 itself applies
    # none there: its own empty "document" placeholder shadows "passage" (docs/protocol.md).
    ("mean", "document", "passage", False),
    ("mean", "classification", "classification", False),  # any prompt the model names
    ("weighted-noprompt", "document", "passage", False),
    ("weighted-noprompt", "classification", "classification", False),
    ("decoder", "query", "query", False),
])
def test_input_type_selects_the_models_prompt(served: tuple[Stack, dict[str, Path]], lane: str,
                                              input_type: str, prompt_name: str | None,
                                              document: bool) -> None:
    stack, folders = served
    with stack.client(timeout=30) as client:
        ours = served_vectors(client, lane, input_type)
        plain = served_vectors(client, lane)
    ref = sm.reference(folders[lane], sm.TEXTS, prompt_name, document)
    assert_faithful(ours, ref, unit=lane == "decoder")
    assert not np.allclose(ours, plain, atol=1e-3)  # the prompt really changed the vectors


def test_ready_describes_the_pipeline(served: tuple[Stack, dict[str, Path]]) -> None:
    stack, _ = served
    with stack.client(timeout=10) as client:
        lanes = client.stats(timeout=5)["lanes"]
    assert lanes["max-dense"]["engines"][0]["pipeline"] == (
        "Transformer → Pooling(max) → Dense(32→16) (modules.json)")
    decoder = lanes["decoder"]["engines"][0]
    assert decoder["pipeline"] == "Transformer → Pooling(lasttoken) → Normalize (modules.json)"
    assert decoder["prompts"] == ["query"] and decoder["dim"] == 32
    assert lanes["multi"]["engines"][0]["dim"] == 96

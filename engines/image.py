"""The image engine's model: an open_clip CLIP serving its image tower and its text tower.

One model, two kinds: ``image`` (photos) and ``clip-text`` (queries, for cross-modal search).
Each kind has its own fingerprint, so their cache entries never mix. Weights come from an
open_clip pretrained tag (downloaded by open_clip where a network allows), a local checkpoint
file, or -- only when asked explicitly -- seeded random weights, which are then announced in
READY, in stats and in a warning at start.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from zembed import protocol as p
from zembed.config import ImageEngineConfig
from zembed.engines.devices import (
    available_cores,
    default_threads,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from zembed.engines.gpudecode import JpegTensorPrep, TensorPreprocess, check_decode
from zembed.engines.imageio import DecodeLimits, FetchPolicy, item_bytes, load_rgb, open_checked
from zembed.engines.model import ItemError
from zembed.engines.sizing import Plan, Sizing, size_engine
from zembed.tools.synthimg import synthetic_pixels

log = logging.getLogger("zembed.engine.image")

RANDOM_SEED = 0


class WeightsUnavailable(RuntimeError):
    """No weights could be had for the requested model; the message says how to provide them."""


def file_hash(path: str | os.PathLike[str]) -> str:
    """blake2b of a checkpoint, so other weights under the same file name change fingerprints."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_weights(arch: str, pretrained: str, random_weights: bool) -> tuple[str | None, str]:
    """(what to pass open_clip as ``pretrained``, weights id for the fingerprint)."""
    import open_clip

    if random_weights:
        return None, f"random-seed{RANDOM_SEED}"
    if arch.startswith("local-dir:"):  # open_clip reads config and weights from the folder
        folder = Path(arch.removeprefix("local-dir:"))
        files = sorted(f for f in folder.iterdir() if f.suffix in (".bin", ".safetensors", ".pt"))
        return None, "local-dir:" + ",".join(file_hash(f) for f in files)
    if arch.startswith("hf-hub:"):  # config and weights come with the hub repo
        return None, arch
    if os.path.isfile(pretrained):
        return pretrained, f"file:{file_hash(pretrained)}"
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise WeightsUnavailable(
            f"--pretrained {pretrained!r} is neither a checkpoint file nor a tag of {arch} "
            f"(tags: {', '.join(tags) or 'none'}). Give a checkpoint file, a known tag, or "
            "--random-weights for smoke tests.")
    try:
        path = open_clip.download_pretrained(tag_cfg)
    except Exception as exc:
        raise WeightsUnavailable(
            f"weights for {arch} / {pretrained!r} are not cached and could not be downloaded "
            f"({type(exc).__name__}: {str(exc)[:200]}). Allow network access once (they are "
            "cached), or download the checkpoint elsewhere and pass --pretrained /path/to/file, "
            "or pass --random-weights for smoke tests and benchmarks.") from None
    return pretrained, f"tag:{pretrained}:{file_hash(path)}"


class ImageModel:
    """open_clip behind the :class:`EmbeddingModel` interface (kinds image and clip-text)."""

    kinds = frozenset({p.KIND_IMAGE, p.KIND_CLIP_TEXT})
    #: CLIP's towers end without a normalisation; requests choose (normalize=true default).
    normalizes = False

    def __init__(self, cfg: ImageEngineConfig) -> None:
        import open_clip

        torch.set_num_threads(cfg.threads if cfg.threads > 0 else default_threads())
        self.device = resolve_device(cfg.device)
        self.decode = check_decode(cfg.decode, self.device)  # before the slow model load
        if cfg.model_config:
            open_clip.add_model_config(cfg.model_config)
        has_schema = cfg.model.startswith(("hf-hub:", "local-dir:"))
        if not has_schema and open_clip.get_model_config(cfg.model) is None:
            raise WeightsUnavailable(
                f"unknown open_clip architecture {cfg.model!r}; known: "
                f"{', '.join(open_clip.list_models()[:20])}, ... (or hf-hub:/local-dir:)")
        self.lane = cfg.lane
        self.arch = cfg.model
        self.random_weights = cfg.random_weights
        pretrained, self.weights_id = resolve_weights(cfg.model, cfg.pretrained,
                                                      cfg.random_weights)
        if cfg.random_weights:
            log.warning("serving RANDOM weights for %s (seed %d): vectors are meaningless; "
                        "for smoke tests and benchmarks only", cfg.model, RANDOM_SEED)
            torch.manual_seed(RANDOM_SEED)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                cfg.model, pretrained=pretrained, device=self.device)
        except RuntimeError as exc:  # schema models: config or weights not reachable
            raise WeightsUnavailable(f"open_clip could not load {cfg.model!r}: {exc}") from None
        self.model = model.to(dtype=self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        with torch.inference_mode():  # the embedding width, whatever the architecture
            self.dim = int(self.model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1])
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.pretrained_label = ("random" if cfg.random_weights else
                                 Path(cfg.pretrained).name if pretrained and
                                 os.path.isfile(pretrained) else cfg.pretrained)
        self.limits = DecodeLimits(cfg.max_pixels, cfg.min_side, cfg.draft, self.image_size)
        self.fetch = FetchPolicy(cfg.fetch_urls, cfg.fetch_allow_hosts, cfg.fetch_max_bytes,
                                 cfg.fetch_timeout_s)
        self.jpeg_prep = (JpegTensorPrep(TensorPreprocess.from_model(self.model), self.device,
                                         self.limits, self.fetch, self._cpu_path)
                          if self.decode == "gpu" else None)
        self.prepare_workers = cfg.decode_workers or max(1, len(os.sched_getaffinity(0)) // 2)
        self._fingerprints = {k: self._make_fingerprint(k) for k in self.kinds}

    def _make_fingerprint(self, kind: str) -> str:
        facts = {"kind": kind, "arch": self.arch, "weights": self.weights_id, "dim": self.dim,
                 "image_size": self.image_size, "dtype": dtype_name(self.dtype)}
        blob = json.dumps(facts, sort_keys=True).encode()
        return f"{kind}-" + hashlib.blake2b(blob, digest_size=10).hexdigest()

    def fingerprint(self, kind: str) -> str:
        """Per kind: architecture, weights (tag + hash, file hash, or random seed), dim, size."""
        return self._fingerprints[kind]

    def describe(self) -> dict[str, Any]:
        """Facts for READY and stats; ``random_weights`` is the one operators must not miss."""
        return {"model": self.arch, "pretrained": self.pretrained_label,
                "random_weights": self.random_weights, "device": str(self.device),
                "dtype": dtype_name(self.dtype), "image_size": self.image_size,
                "draft": self.limits.draft, "decode": self.decode,
                "decode_workers": self.prepare_workers,
                "threads": torch.get_num_threads()}

    def prepare(self, kind: str, items: list[Any], input_type: str | None) -> list[Any]:
        """Images: fetch/decode/check/preprocess each to a tensor, or an ItemError.

        ``--decode gpu``: JPEGs through the tensor pipeline on the model's GPU, the rest on
        the CPU path (engines/gpudecode.py says why this happens here, on the decode pool).
        """
        if kind == p.KIND_CLIP_TEXT:
            return list(items)
        if self.jpeg_prep is not None:
            return self.jpeg_prep.prepare(items)
        return self.prepare_cpu(items)

    def prepare_cpu(self, items: list[Any]) -> list[Any]:
        """The CPU path for image items: PIL decode and open_clip's transform, per item."""
        return [self._prepare_image(item) for item in items]

    def _prepare_image(self, item: Any) -> Any:
        data = item_bytes(item, self.fetch)
        if isinstance(data, ItemError):
            return data
        img = open_checked(data, self.limits)
        if isinstance(img, ItemError):
            return img
        return self._cpu_path(img)

    def _cpu_path(self, img: Image.Image) -> torch.Tensor | ItemError:
        """Decode a header-checked image with PIL, then open_clip's own preprocessing."""
        rgb = load_rgb(img, self.limits)
        if isinstance(rgb, ItemError):
            return rgb
        try:
            tensor: torch.Tensor = self.preprocess(rgb)
        except Exception as exc:
            return ItemError(p.BAD_REQUEST, f"image could not be preprocessed: {exc}")
        return tensor

    def cost(self, prepared: Any) -> int:
        """Images all cost the same after preprocessing; texts sort by length."""
        return len(prepared) if isinstance(prepared, str) else 0

    @torch.inference_mode()
    def forward(self, kind: str, inputs: list[Any]) -> npt.NDArray[np.float32]:
        """Image tower on stacked tensors, or text tower on tokenised texts; fp32 out."""
        if kind == p.KIND_CLIP_TEXT:
            tokens = self.tokenizer(inputs).to(self.device)
            out = self.model.encode_text(tokens)
        else:
            batch = torch.stack(inputs).to(self.device, self.dtype)
            out = self.model.encode_image(batch)
        result: npt.NDArray[np.float32] = out.float().cpu().numpy()
        return result

    def warmup(self, plan: Plan) -> tuple[Sizing, dict[str, Any]]:
        """Size the engine from forward passes of a preprocessed synthetic JPEG, and measure
        the decode rate (640x480 JPEGs, on this thread); return the choice and READY's extras.

        Decoding runs on the decode pool, beside the forward pass, so it does not enter the
        curve; ``warmup_decode_per_s`` says whether one decode thread keeps up with it.
        """
        jpeg = synthetic_jpeg(640, 480)
        decoded = 8
        t0 = time.perf_counter()
        images = self.prepare(p.KIND_IMAGE, [jpeg] * decoded, None)
        decode_s = time.perf_counter() - t0

        def run_pass(n: int) -> None:
            self.forward(p.KIND_IMAGE, [images[0]] * n)

        sizing = size_engine(run_pass, plan, self.device.type, torch.set_num_threads,
                             torch.get_num_threads(), available_cores())
        self.forward(p.KIND_CLIP_TEXT, ["a photo of a red shoe"] * sizing.max_batch)
        return sizing, {"warmup_items_per_s": round(sizing.chosen.items_per_s, 1),
                        "warmup_decode_per_s": round(decoded / decode_s, 1),
                        "sizing": sizing.to_ready()}


def synthetic_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG of the given size, encoded by Pillow (what the warm-up decodes)."""
    buf = io.BytesIO()
    Image.fromarray(synthetic_pixels(width, height, seed)).save(buf, format="JPEG",
                                                                quality=quality)
    return buf.getvalue()

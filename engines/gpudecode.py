"""JPEG decoding and preprocessing as tensor operations: nvJPEG on the model's GPU (``--decode gpu``).

The pipeline is decode (``torchvision.io.decode_jpeg``, a whole list in one call) → resize →
center crop → normalize, all torch ops on whatever device the decoded tensors are on, so the
same code runs on CPU tensors in the tests and on CUDA tensors in a GPU engine. It reproduces
the model's own open_clip preprocessing: size, mean, std, resize mode and interpolation are
read from the model's ``preprocess_cfg``, never hard-coded.

Only JPEGs go this way. Every item first passes :func:`~zembed.engines.imageio.open_checked`
(header only: format, pixel-bomb guard, smallest side, and scan data too short for the size the
header claims), exactly as on the CPU path. nvJPEG gets the original bytes: the CPU path's
stricter end-of-scan decode (``check_jpeg``, which catches a sequential JPEG cut short and given
an end marker) is not applied here, because how nvJPEG treats a stream without an end marker
has not been measured on a GPU. Other
formats (PNG, WebP, GIF, BMP), and any JPEG that ``decode_jpeg`` rejects or decodes to another
size than its header said, take the CPU path (PIL and open_clip's transform) for that item
alone; a JPEG that PIL cannot decode either is that item's :class:`ItemError`.

**Where it runs: in ``prepare``, on the decode pool.** The engine runtime submits ``prepare``
to its pool as each request arrives, while the inference thread runs the forward pass of the
batch before (engines/runtime.py). Each pool thread issues its decode and resize kernels on a
CUDA stream of its own and waits for that stream only, so the GPU decodes (on the H100/A100
hardware JPEG engine for baseline JPEGs, on the SMs otherwise) while the model computes, and
the forward pass gets finished tensors already on the device. Decoding in ``forward`` instead
would batch across requests, but it would put the decode in series with the model on the one
inference thread, which is what the pool exists to avoid. A request's items are decoded in one
call (torchvision serialises its CUDA decoder behind a lock in any case).

The prepared tensors stay on the GPU (3 x size x size float32, 0.6 MB at 224), bounded by the
engine's credits. The fingerprint does not change with the decoder: nvJPEG and libjpeg differ
by about one grey level per pixel, like JPEG draft mode, so CPU and GPU engines share a cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from zembed.engines.imageio import DecodeLimits, FetchPolicy, item_bytes, open_checked
from zembed.engines.model import ItemError

#: Values of ``--decode``.
DECODE_MODES = ("cpu", "gpu")


class DecodeUnavailable(ValueError):
    """``--decode gpu`` asked for where it cannot run (no CUDA device, no nvJPEG)."""


def check_decode(mode: str, device: torch.device) -> str:
    """Validate ``--decode`` against the engine's device; raises :class:`DecodeUnavailable`."""
    if mode not in DECODE_MODES:
        raise DecodeUnavailable(f"--decode must be one of {', '.join(DECODE_MODES)}, not {mode!r}")
    if mode == "gpu" and device.type != "cuda":
        why = ("no CUDA device is available" if not torch.cuda.is_available()
               else f"this engine runs on {device}")
        raise DecodeUnavailable(
            f"--decode gpu decodes JPEGs with nvJPEG on the model's CUDA device, but {why}. "
            "Run the engine with --device cuda (or cuda:N) on a GPU host, or use --decode cpu.")
    return mode


@dataclass(frozen=True, slots=True)
class TensorPreprocess:
    """open_clip's eval preprocessing, as parameters for tensor ops."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # or bilinear
    resize_mode: str = "shortest"  # shortest, longest or squash
    fill_color: int = 0

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> TensorPreprocess:
        """From an open_clip preprocess config dict (missing keys: open_clip's defaults)."""
        from dataclasses import asdict

        from open_clip.transform import PreprocessCfg

        full = {**asdict(PreprocessCfg()), **{k: v for k, v in cfg.items() if v is not None}}
        size = full["size"]
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))

        def triple(v: Any) -> tuple[float, float, float]:
            vals = [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * 3
            return (vals[0], vals[1], vals[2])

        interpolation = "bilinear" if full["interpolation"] == "bilinear" else "bicubic"
        return cls(hw, triple(full["mean"]), triple(full["std"]), interpolation,
                   full["resize_mode"], int(full["fill_color"]))

    @classmethod
    def from_model(cls, model: Any) -> TensorPreprocess:
        """What open_clip's ``create_model_and_transforms`` built the model's transform from."""
        import open_clip

        return cls.from_cfg(dict(open_clip.get_model_preprocess_cfg(model)))


def _keep_ratio_size(height: int, width: int, target: tuple[int, int],
                     longest: float) -> list[int]:
    """open_clip's ``ResizeKeepRatio.get_params`` without the random parts."""
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return [round(height / ratio), round(width / ratio)]


def resize_crop(img: torch.Tensor, pp: TensorPreprocess) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, h, w) of the model's input size, as open_clip does it.

    Mirrors ``open_clip.transform.image_transform(is_train=False)`` branch by branch; the
    resize is antialiased like PIL's, and rounds back to uint8 as PIL does.
    """
    import torchvision.transforms.functional as F
    from open_clip.transform import center_crop_or_pad
    from torchvision.transforms import InterpolationMode

    mode = (InterpolationMode.BILINEAR if pp.interpolation == "bilinear"
            else InterpolationMode.BICUBIC)
    height, width = int(img.shape[-2]), int(img.shape[-1])
    if pp.resize_mode == "squash":
        squashed: torch.Tensor = F.resize(img, list(pp.size), interpolation=mode, antialias=True)
        return squashed
    if pp.resize_mode == "longest":
        img = F.resize(img, _keep_ratio_size(height, width, pp.size, 1.0), interpolation=mode,
                       antialias=True)
        result: torch.Tensor = center_crop_or_pad(img, list(pp.size), fill=pp.fill_color)
        return result
    if pp.size[0] == pp.size[1]:  # torchvision's shortest-edge Resize
        img = F.resize(img, [pp.size[0]], interpolation=mode, antialias=True)
    else:  # open_clip uses ResizeKeepRatio at its default (bicubic) here
        img = F.resize(img, _keep_ratio_size(height, width, pp.size, 0.0),
                       interpolation=InterpolationMode.BICUBIC, antialias=True)
    cropped: torch.Tensor = F.center_crop(img, list(pp.size))
    return cropped


def normalize(batch: torch.Tensor, pp: TensorPreprocess) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> float32, scaled to [0, 1] then standardised per channel."""
    mean = torch.tensor(pp.mean, dtype=torch.float32).view(1, 3, 1, 1).to(batch.device)
    std = torch.tensor(pp.std, dtype=torch.float32).view(1, 3, 1, 1).to(batch.device)
    return (batch.float() / 255.0 - mean) / std


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 (3, H, W) per JPEG on ``device``, in one ``decode_jpeg`` call where it can;
    ``None`` for each one ``decode_jpeg`` rejects.

    ``decode_jpeg`` returns nothing when any image of a list fails, so after a failed list
    the images are decoded one by one to find out which.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        if len(encoded) == 1:
            return [None]
    out: list[torch.Tensor | None] = []
    for one in encoded:
        try:
            out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            out.append(None)
    return out


def decode_preprocess(datas: list[bytes], pp: TensorPreprocess, device: torch.device,
                      sizes: list[tuple[int, int]] | None = None) -> list[torch.Tensor | None]:
    """The tensor pipeline: JPEG bytes -> model inputs (float32 (3, h, w) on ``device``).

    ``None`` for an image that ``decode_jpeg`` rejects, or whose decoded (width, height)
    differs from ``sizes`` (the header the limits were checked against).
    """
    decoded = decode_jpegs(datas, device)
    out: list[torch.Tensor | None] = [None] * len(datas)
    ready: list[tuple[int, torch.Tensor]] = []
    for i, img in enumerate(decoded):
        if img is None:
            continue
        if sizes is not None and (int(img.shape[-1]), int(img.shape[-2])) != sizes[i]:
            continue
        try:
            ready.append((i, resize_crop(img, pp)))
        except RuntimeError:
            continue
    if ready:
        batch = normalize(torch.stack([t for _, t in ready]), pp)
        for (i, _), tensor in zip(ready, batch.unbind(0), strict=True):
            out[i] = tensor
    return out


class JpegTensorPrep:
    """``prepare`` for image items with the tensor pipeline, falling back to the CPU path.

    :param cpu_path: the engine's PIL path for one opened (header-checked, not yet decoded)
        image: a CPU tensor, or an :class:`ItemError`.
    """

    def __init__(self, pp: TensorPreprocess, device: torch.device, limits: DecodeLimits,
                 fetch: FetchPolicy,
                 cpu_path: Callable[[Image.Image], torch.Tensor | ItemError]) -> None:
        self.pp = pp
        self.device = device
        self.limits = limits
        self.fetch = fetch
        self.cpu_path = cpu_path
        #: JPEGs that went to the CPU path after the tensor pipeline refused them.
        self.fallbacks = 0
        #: JPEGs decoded by the tensor pipeline.
        self.decoded = 0
        self._local = threading.local()

    @contextmanager
    def _stream(self) -> Iterator[None]:
        """On CUDA: this thread's own stream, waited for before the tensors are handed over."""
        if self.device.type != "cuda":
            yield
            return
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        with torch.cuda.stream(stream):
            yield
        # The forward pass reads these tensors on the inference thread's stream; they must be
        # complete. (They are freed only after that forward pass has synchronised, so the
        # allocator cannot hand their memory to this stream while it is still being read.)
        stream.synchronize()

    def prepare(self, items: list[Any]) -> list[Any]:
        """One model input (a tensor on the device) or :class:`ItemError` per item."""
        out: list[Any] = [None] * len(items)
        jpegs: list[tuple[int, bytes, Image.Image]] = []
        for i, item in enumerate(items):
            data = item_bytes(item, self.fetch)
            if isinstance(data, ItemError):
                out[i] = data
                continue
            img = open_checked(data, self.limits)
            if isinstance(img, ItemError):
                out[i] = img
            elif img.format == "JPEG":
                jpegs.append((i, data, img))
            else:
                out[i] = img
        with self._stream():
            tensors = decode_preprocess([d for _, d, _ in jpegs], self.pp, self.device,
                                        [img.size for _, _, img in jpegs])
            for (i, _, img), tensor in zip(jpegs, tensors, strict=True):
                if tensor is None:
                    self.fallbacks += 1
                    out[i] = img
                else:
                    self.decoded += 1
                    out[i] = tensor
            for i, value in enumerate(out):
                if isinstance(value, Image.Image):  # other formats, and refused JPEGs
                    done = self.cpu_path(value)
                    out[i] = done if isinstance(done, ItemError) else done.to(self.device)
        return out

"""``--decode gpu``'s tensor pipeline, run here on CPU tensors (torchvision's CPU decode_jpeg).

The engine runs the same functions on CUDA tensors; what a CPU run can check is that they
reproduce open_clip's own preprocessing, that non-JPEGs and refused JPEGs take the PIL path
for that item alone, that the limits apply before any decoding, and that ``--decode gpu``
without CUDA stops the engine at start with a clear message.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from images import bomb_png, jpeg, png
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from zembed.config import ImageEngineConfig
from zembed.engines import gpudecode
from zembed.engines.gpudecode import (
    DecodeUnavailable,
    JpegTensorPrep,
    TensorPreprocess,
    check_decode,
    decode_preprocess,
)
from zembed.engines.image import ImageModel, synthetic_jpeg
from zembed.engines.model import ItemError

CPU = torch.device("cpu")
PHOTOS = {"landscape 640x480": synthetic_jpeg(640, 480, seed=3),
          "portrait 150x260": jpeg(4, 150, 260), "small 96x72": jpeg(1)}


def reference(data: bytes, cfg: dict[str, Any]) -> torch.Tensor:
    """What open_clip's own eval transform makes of a fully decoded (PIL) picture."""
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    out: torch.Tensor = transform(Image.open(io.BytesIO(data)).convert("RGB"))
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within about one grey level per pixel (PIL and torch round their resizes differently)."""
    assert got.shape == want.shape and got.dtype == torch.float32
    diff = (got - want).abs()
    assert diff.mean().item() < 0.006, diff.mean().item()
    assert diff.max().item() < 0.05, diff.max().item()  # 0.015 = one level / std


@pytest.mark.parametrize("cfg", [
    {"size": 224},  # CLIP's: shortest side to 224, center crop, OpenAI mean/std
    {"size": 64, "resize_mode": "longest", "fill_color": 0, "mean": (0.5, 0.5, 0.5),
     "std": (0.5, 0.5, 0.5)},  # SigLIP-like mean/std, letterboxed
    {"size": 48, "resize_mode": "squash", "interpolation": "bilinear"},
    {"size": (40, 56)},  # non-square: ResizeKeepRatio, then center crop
], ids=["shortest", "longest", "squash-bilinear", "shortest-nonsquare"])
def test_tensor_pipeline_matches_open_clip_preprocess(cfg: dict[str, Any]) -> None:
    pp = TensorPreprocess.from_cfg(cfg)
    got = decode_preprocess(list(PHOTOS.values()), pp, CPU)
    for (name, data), tensor in zip(PHOTOS.items(), got, strict=True):
        assert tensor is not None, name
        assert_close(tensor, reference(data, cfg))


def test_preprocess_config_comes_from_the_model(tiny: tuple[Path, Path]) -> None:
    model, _, transform = open_clip.create_model_and_transforms("zembed-tiny",
                                                                pretrained=str(tiny[1]))
    pp = TensorPreprocess.from_model(model)
    assert pp.size == (32, 32) and pp.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    data = PHOTOS["landscape 640x480"]
    got = decode_preprocess([data], pp, CPU)[0]
    assert got is not None
    assert_close(got, transform(Image.open(io.BytesIO(data)).convert("RGB")))
    # A tag's own preprocessing (SigLIP's, for instance) is what the pipeline then follows.
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                               "resize_mode": "squash"})
    assert TensorPreprocess.from_model(model) == TensorPreprocess(
        (32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "squash", 0)


@pytest.fixture(scope="module")
def tiny_model(tiny: tuple[Path, Path]) -> ImageModel:
    """The tiny CLIP as the engine loads it (CPU decode): its CPU path is the fallback."""
    return ImageModel(ImageEngineConfig(model="zembed-tiny", model_config=str(tiny[0]),
                                        pretrained=str(tiny[1]), device="cpu", dtype="fp32",
                                        threads=1))


def tensor_prep(model: ImageModel) -> JpegTensorPrep:
    """What ``--decode gpu`` builds, on the CPU."""
    return JpegTensorPrep(TensorPreprocess.from_model(model.model), CPU, model.limits,
                          model.fetch, model._cpu_path)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim ``width`` x ``height``."""
    data = bytearray(jpeg(2))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_png_falls_back_and_a_corrupt_jpeg_fails_alone(tiny_model: ImageModel) -> None:
    prep = tensor_prep(tiny_model)
    good, other, picture = jpeg(5, 120, 90), png(6), PHOTOS["portrait 150x260"]
    corrupt = good[:len(good) // 2]  # a sound header, then the data stops
    items = [good, other, corrupt, picture]
    got = prep.prepare(items)
    want = tiny_model.prepare_cpu(items)
    assert isinstance(got[2], ItemError) and got[2].status == 400, got[2]
    assert "corrupt JPEG" in got[2].message
    assert_close(got[0], tiny_model.preprocess(Image.open(io.BytesIO(good)).convert("RGB")))
    assert_close(got[3], tiny_model.preprocess(Image.open(io.BytesIO(picture)).convert("RGB")))
    assert torch.equal(got[1], want[1])  # the PNG took the PIL path: identical to CPU mode
    assert (prep.decoded, prep.fallbacks) == (2, 1)  # the corrupt JPEG was tried, then PIL
    # The model takes the mixed batch as it comes from prepare.
    vectors = tiny_model.forward("image", [got[0], got[1], got[3]])
    assert vectors.shape == (3, tiny_model.dim)


def test_limits_apply_before_any_decoding(tiny_model: ImageModel,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []
    real = gpudecode.decode_jpegs

    def spy(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
        seen.extend(datas)
        return real(datas, device)

    monkeypatch.setattr(gpudecode, "decode_jpegs", spy)
    good = jpeg(7)
    bomb_jpeg, tiny_jpeg = jpeg_claiming(50_000, 50_000), jpeg(8, 6, 6)
    got = tensor_prep(tiny_model).prepare([bomb_jpeg, bomb_png(), tiny_jpeg, good, b"", "x.jpg"])
    assert [g.status if isinstance(g, ItemError) else "ok" for g in got] == [
        413, 413, 400, "ok", 400, 400]
    assert seen == [good]  # only the image that passed its header checks reached the decoder


def test_decode_size_must_match_the_checked_header() -> None:
    pp = TensorPreprocess.from_cfg({"size": 32})
    data = jpeg(9)
    assert decode_preprocess([data], pp, CPU, [(96, 72)])[0] is not None
    assert decode_preprocess([data], pp, CPU, [(97, 72)])[0] is None  # -> the PIL path


def test_one_bad_jpeg_in_a_list_does_not_lose_the_others() -> None:
    good = [jpeg(10), jpeg(11)]
    out = gpudecode.decode_jpegs([good[0], b"\xff\xd8 not really", good[1]], CPU)
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert out[0].shape == (3, 72, 96)


def test_decode_gpu_without_cuda_fails_at_start(tiny: tuple[Path, Path]) -> None:
    with pytest.raises(DecodeUnavailable, match=r"--decode gpu .*--device cuda"):
        ImageModel(ImageEngineConfig(model="zembed-tiny", model_config=str(tiny[0]),
                                     pretrained=str(tiny[1]), device="cpu", decode="gpu"))
    with pytest.raises(DecodeUnavailable, match="must be one of cpu, gpu"):
        check_decode("fast", CPU)
    assert check_decode("cpu", CPU) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DecodeUnavailable, match="no CUDA device is available"):
            check_decode("gpu", CPU)

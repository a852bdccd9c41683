"""The image lane end to end: a tiny open_clip checkpoint made here, served by a real engine.

The checkpoint is a real open_clip CLIP (2-layer towers, 32-d output) built from a model
config this module writes and saved with torch; the engine loads it through open_clip's own
``--pretrained <file>`` path, exactly as it would load downloaded weights.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Stack, both_lanes
from images import bomb_png, cut_with_eoi, data_uri, encode, jpeg, lying_jpeg, picture, png, write

from zembed.client import AsyncClient, Client, Overloaded
from zembed.errors import ZembedError


@pytest.fixture(scope="module")
def lanes(tiny: tuple[Path, Path]) -> Iterator[Stack]:
    """Broker serving both lanes, one text engine, one tiny image engine (16 credits, fp32)."""
    with both_lanes(tiny) as stack:
        yield stack


@pytest.fixture
def client(lanes: Stack) -> Iterator[Client]:
    with lanes.client(timeout=20) as c:
        yield c


def expected_vector(tiny: tuple[Path, Path], image: bytes) -> np.ndarray:
    """The same image through open_clip in this process, from the same checkpoint file."""
    import io

    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms("zembed-tiny",
                                                                 pretrained=str(tiny[1]))
    with torch.inference_mode():
        x = preprocess(Image.open(io.BytesIO(image)).convert("RGB")).unsqueeze(0)
        v = model.encode_image(x).float().numpy()[0]
    return v / np.linalg.norm(v)


def test_vectors_come_from_the_checkpoint(client: Client, tiny: tuple[Path, Path]) -> None:
    img = png(1)
    got = client.embed_images([img]).vectors[0]
    assert got.shape == (32,)
    # Random init would not match: the engine really loaded the file (bf16 rounding apart).
    assert np.allclose(got, expected_vector(tiny, img), atol=1e-2)


def test_dim_norm_determinism_and_difference(client: Client) -> None:
    images = [jpeg(1), jpeg(2), png(3)]
    a = client.embed_images(images)
    b = client.embed_images(images)
    assert a.vectors.shape == (3, 32) and not a.item_errors
    assert np.array_equal(a.vectors, b.vectors)
    assert np.allclose(np.linalg.norm(a.vectors, axis=1), 1.0, atol=0.01)
    raw = client.embed_images(images, normalize=False).vectors
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=0.05)
    sims = a.vectors @ a.vectors.T
    assert sims[0, 1] < 0.999 and sims[0, 2] < 0.999 and sims[1, 2] < 0.999


def test_clip_text_tower(client: Client) -> None:
    texts = ["a red shoe", "a blue sky", "a red shoe"]
    v = client.embed_clip_texts(texts)
    assert v.shape == (3, 32)
    assert np.array_equal(v[0], v[2]) and not np.allclose(v[0], v[1], atol=1e-3)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=0.01)


def test_one_bad_image_fails_only_itself(client: Client) -> None:
    good = [jpeg(1), png(2)]
    items = [good[0], b"", b"\x00garbage", jpeg(5)[:150], bomb_png(),
             encode(picture(1, 4, 4), "PNG"), encode(picture(1), "TIFF"), good[1],
             "http://127.0.0.1:9/not-allowed-port.png"]
    result = client.embed_images(items)
    assert result.vectors.shape == (9, 32)
    assert sorted(result.item_errors) == [1, 2, 3, 4, 5, 6, 8]
    assert result.item_errors[4][0] == 413 and "pixels" in result.item_errors[4][1]
    assert result.item_errors[1][0] == 400 and "empty" in result.item_errors[1][1]
    for i in result.item_errors:
        assert not result.vectors[i].any()  # failed rows are zeros
    alone = client.embed_images(good).vectors
    assert np.array_equal(result.vectors[[0, 7]], alone)  # neighbours did not change a thing
    assert client.embed_images([png(9)]).vectors.shape == (1, 32)  # still serving


def test_truncated_and_lying_jpegs_are_per_item_400s(client: Client) -> None:
    """The outside probe's 6000x6000 header over 64x64 of data, and a JPEG cut short and given
    an end marker: libjpeg pads both with grey and raises nothing; the engine refuses them."""
    good = [jpeg(21, 320, 240), png(22)]
    items = [good[0], lying_jpeg(6000, 6000), cut_with_eoi(jpeg(23, 640, 480), 0.5), good[1]]
    result = client.embed_images(items)
    assert sorted(result.item_errors) == [1, 2]
    for i in (1, 2):
        status, message = result.item_errors[i]
        assert status == 400 and "truncated or corrupt JPEG image" in message, message
        assert not result.vectors[i].any()
    alone = client.embed_images(good).vectors
    assert np.array_equal(result.vectors[[0, 3]], alone) and alone.any()


def test_formats_and_client_side_conversions(client: Client, tmp_path: Path) -> None:
    pic = picture(6)
    as_png = encode(pic, "PNG")
    forms = [as_png, data_uri(as_png), pic, np.asarray(pic), write(tmp_path / "p.png", as_png),
             str(tmp_path / "p.png")]
    v = client.embed_images(forms).vectors
    for row in v[1:]:
        assert np.array_equal(row, v[0])  # every form is the very same pixels
    others = [encode(pic, fmt) for fmt in ("JPEG", "WEBP", "GIF", "BMP")]
    result = client.embed_images(others)
    assert not result.item_errors
    assert (result.vectors @ v[0] > 0.8).all()  # lossy/paletted copies of the same picture


def test_image_lane_saturation_never_touches_text(lanes: Stack) -> None:
    """Image clients get 429s; text requests, meanwhile, all succeed."""
    image_status: dict[str, int] = {"ok": 0, "429": 0, "other": 0}
    text_latencies: list[float] = []

    # Distinct images per flooder: identical ones would be computed once (single-flight).
    photos = [jpeg(seed, 320, 240) for seed in range(64)]

    async def flood(c: AsyncClient, stop: float, k: int) -> None:
        while time.monotonic() < stop:
            try:
                await c.embed_images(photos[4 * k:4 * k + 4])
                image_status["ok"] += 1
            except Overloaded:
                image_status["429"] += 1
            except ZembedError:
                image_status["other"] += 1

    async def texts(c: AsyncClient, stop: float) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            v = await c.embed_texts(["a query that must not wait for images"])
            text_latencies.append(time.perf_counter() - t0)
            assert v.shape == (1, 384)

    async def main() -> None:
        stop = time.monotonic() + 3.0
        async with AsyncClient(lanes.frontend, timeout=20, retries=0) as c:  # see each 429
            await asyncio.gather(texts(c, stop), *(flood(c, stop, k) for k in range(16)))

    with lanes.client() as c:
        before = c.stats()["lanes"]["text"]["requests"]
    asyncio.run(main())
    with lanes.client() as c:
        after = c.stats()["lanes"]["text"]["requests"]
    assert image_status["429"] > 0 and image_status["other"] == 0
    assert len(text_latencies) > 5
    assert after["429"] == before["429"] and after["503"] == before["503"]
    assert after["200"] - before["200"] == len(text_latencies)


def test_missing_weights_refuse_to_start_with_advice(tiny: tuple[Path, Path]) -> None:
    cases: list[tuple[list[str], str]] = [
        (["--model", "ViT-B-32", "--pretrained", "openai"], "--random-weights"),
        (["--model", "ViT-B-32", "--pretrained", "/nonexistent/weights.pt"], "checkpoint file"),
        (["--model", "no-such-arch"], "unknown open_clip architecture"),
    ]
    for args, advice in cases:
        out = subprocess.run([sys.executable, "-m", "zembed", "start", "image", *args],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, out.stderr[-1000:]
        assert advice in out.stderr


@pytest.mark.slow
def test_vit_b_32_with_random_weights(stack_factory: Callable[[], Stack]) -> None:

    stack = stack_factory()
    stack.start_broker("--lanes", "image")
    stack.start_image("--random-weights", "--max-batch", "4")
    stack.wait_engines("image", 1, timeout=180)
    with stack.client(timeout=60) as c:
        result = c.embed_images([jpeg(1, 640, 480), jpeg(2, 640, 480)])
        assert result.vectors.shape == (2, 512) and not result.item_errors
        assert c.embed_clip_texts(["a photo"]).shape == (1, 512)
        engine = c.stats()["lanes"]["image"]["engines"][0]
        assert engine["random_weights"] is True and engine["model"] == "ViT-B-32"


def test_async_client_images_and_clip_texts(lanes: Stack) -> None:
    async def main() -> tuple[object, np.ndarray]:
        async with AsyncClient(lanes.frontend, timeout=20) as c:
            return await asyncio.gather(c.embed_images([png(1), b""]),
                                        c.embed_clip_texts(["a red shoe"]))

    images, texts = asyncio.run(main())
    with lanes.client() as c:
        want = c.embed_images([png(1)]).vectors[0]
    assert np.array_equal(images.vectors[0], want)  # type: ignore[attr-defined]
    assert list(images.item_errors) == [1]  # type: ignore[attr-defined]
    assert texts.shape == (1, 32)


def test_cli_embed_image_and_clip_text(lanes: Stack, tmp_path: Path) -> None:
    good, bad = write(tmp_path / "good.png", png(1)), write(tmp_path / "bad.png", b"nope")
    out = subprocess.run([sys.executable, "-m", "zembed", "embed", "image", str(good), str(bad),
                          "--json", "--endpoint", lanes.frontend],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows[0]["input"] == str(good) and len(rows[0]["vector"]) == 32
    assert rows[1]["error"][0] == 400
    out = subprocess.run([sys.executable, "-m", "zembed", "embed", "clip-text", "a red shoe",
                          "--endpoint", lanes.frontend], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and len(out.stdout.split("\t")[1].split()) == 32
    missing = subprocess.run([sys.executable, "-m", "zembed", "embed", "image",
                              str(tmp_path / "missing.jpg"), "--endpoint", lanes.frontend],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "missing.jpg" in missing.stderr


def test_up_brings_the_image_engine_too(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from conftest import free_port

    fe, be = free_port(), free_port()
    config = tmp_path / "zembed.toml"
    config.write_text(
        f'[broker]\nfrontend = "tcp://127.0.0.1:{fe}"\nbackend = "tcp://127.0.0.1:{be}"\n'
        f'[text]\nbroker = "tcp://127.0.0.1:{be}"\nthreads = 1\n'
        f'[image]\nbroker = "tcp://127.0.0.1:{be}"\nthreads = 1\nmodel = "zembed-tiny"\n'
        f'model_config = "{tiny[0]}"\npretrained = "{tiny[1]}"\n'
        f'[client]\nendpoint = "tcp://127.0.0.1:{fe}"\n')
    out = subprocess.run([sys.executable, "-m", "zembed", "up", "--demo", "--config",
                          str(config)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lanes text,image" in out.stdout
    assert "shape (4, 32); item errors: {3: (400," in out.stdout
    assert "RANDOM" not in out.stdout  # real (tiny) weights from a file

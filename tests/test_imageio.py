"""Image item decoding and fetching, in-process: every failure is one item's clear error."""

from __future__ import annotations

import http.server
import io
import threading
from collections.abc import Iterator

import pytest
from images import bomb_png, cut_with_eoi, data_uri, encode, jpeg, lying_jpeg, picture, png
from PIL import Image, ImageFile

from zembed.engines.imageio import (
    DecodeLimits,
    FetchPolicy,
    decode,
    item_bytes,
    jpeg_layout,
    open_checked,
)
from zembed.engines.model import ItemError

LIMITS = DecodeLimits(max_pixels=1_000_000, min_side=8, draft=True, target=32)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    img = decode(encode(picture(1), fmt), LIMITS)
    assert isinstance(img, Image.Image) and img.mode == "RGB"


def test_gif_uses_the_first_frame() -> None:
    frames = [picture(1).convert("P"), picture(2).convert("P")]
    import io

    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = decode(buf.getvalue(), LIMITS)
    assert isinstance(img, Image.Image)
    import numpy as np

    assert np.array_equal(np.asarray(img), np.asarray(frames[0].convert("RGB")))


@pytest.mark.parametrize(("data", "status", "words"), [
    (b"", 400, "empty"),
    (b"GIF89a but not really", 400, "not a JPEG"),
    (png(2)[:-40], 400, "corrupt"),  # truncated PNG: the header is fine, the data is not
    (b"%PDF-1.4 not an image", 400, "not a JPEG"),
    (encode(picture(1), "TIFF"), 400, "not a JPEG"),
    (jpeg(1)[:200], 400, "corrupt"),
    (bomb_png(), 413, "pixels"),
    (encode(picture(1, 4, 4), "PNG"), 400, "too small"),
])
def test_bad_images_fail_alone(data: bytes, status: int, words: str) -> None:
    err = decode(data, LIMITS)
    assert isinstance(err, ItemError), err
    assert err.status == status and words in err.message


def test_draft_mode_decodes_smaller_but_never_below_target() -> None:
    big = jpeg(3, 640, 480)
    drafted = decode(big, DecodeLimits(target=224))
    full = decode(big, DecodeLimits(target=224, draft=False))
    assert isinstance(drafted, Image.Image) and isinstance(full, Image.Image)
    assert full.size == (640, 480)
    assert drafted.size == (320, 240)  # 1/2 scale: still >= 224 on both sides


BIG = DecodeLimits(max_pixels=40_000_000, target=224)
FULL = DecodeLimits(max_pixels=40_000_000, draft=False)


def _progressive(seed: int, width: int = 640, height: int = 480) -> bytes:
    return encode(picture(seed, width, height), "JPEG", quality=90, progressive=True)


def test_truncated_images_are_refused_even_with_pillows_lax_mode_around() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # turned off by the module, on purpose
    whole = jpeg(5, 640, 480)
    for limits in (BIG, FULL):  # draft mode still entropy-decodes every block
        err = decode(whole[:len(whole) * 2 // 3], limits)  # the data just stops
        assert isinstance(err, ItemError) and err.status == 400, err
        assert "truncated or corrupt JPEG" in err.message


@pytest.mark.parametrize("limits", [BIG, FULL], ids=["draft", "full"])
@pytest.mark.parametrize("data", [
    lying_jpeg(6000, 6000),  # the probe's image: 64x64 of data under a 6000x6000 header
    lying_jpeg(6000, 6000, _progressive(3, 64, 64)),
    lying_jpeg(2000, 1500, encode(picture(4, 64, 64).convert("L"), "JPEG")),
], ids=["baseline", "progressive", "grey"])
def test_a_header_claiming_more_pixels_than_the_data_holds_is_refused(
        data: bytes, limits: DecodeLimits) -> None:
    err = decode(data, limits)
    assert isinstance(err, ItemError) and err.status == 400, err
    assert "truncated or corrupt JPEG" in err.message and "header says" in err.message
    # Refused by the header check itself, so the GPU path (which decodes after it) is covered.
    assert isinstance(open_checked(data, limits), ItemError)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97])
@pytest.mark.parametrize("limits", [BIG, FULL], ids=["draft", "full"])
def test_a_sequential_jpeg_cut_short_and_given_an_end_marker_is_refused(
        keep: float, limits: DecodeLimits) -> None:
    whole = jpeg(6, 640, 480)
    assert isinstance(decode(whole, limits), Image.Image)
    err = decode(cut_with_eoi(whole, keep), limits)
    assert isinstance(err, ItemError) and err.status == 400, err
    assert "truncated or corrupt JPEG image: image file is truncated" in err.message


def _variants() -> list[tuple[str, bytes]]:
    out = []
    for width, height in ((640, 480), (333, 97), (17, 1031)):
        img = picture(width % 7, width, height)
        out += [(f"{width}x{height}-420", encode(img, "JPEG", quality=90)),
                (f"{width}x{height}-444-optimized",
                 encode(img, "JPEG", quality=95, subsampling=0, optimize=True)),
                (f"{width}x{height}-422-q30", encode(img, "JPEG", quality=30, subsampling=1)),
                (f"{width}x{height}-grey", encode(img.convert("L"), "JPEG")),
                (f"{width}x{height}-cmyk", encode(img.convert("CMYK"), "JPEG")),
                (f"{width}x{height}-restarts", encode(img, "JPEG", restart_marker_blocks=3)),
                (f"{width}x{height}-progressive", encode(img, "JPEG", progressive=True))]
    out.append(("flat-grey", encode(Image.new("RGB", (64, 64), (128, 128, 128)), "JPEG")))
    return out


@pytest.mark.parametrize(("name", "data"), _variants(), ids=[n for n, _ in _variants()])
def test_the_strict_decode_gives_a_whole_jpeg_the_same_pixels(name: str, data: bytes) -> None:
    layout = jpeg_layout(data)
    assert layout is not None and layout.scans[-1].end is not None
    for limits in (BIG, FULL):
        ours = decode(data, limits)
        assert isinstance(ours, Image.Image), (name, ours)
        plain = Image.open(io.BytesIO(data))
        if limits.draft:
            plain.draft("RGB", (limits.target, limits.target))
        assert ours.tobytes() == plain.convert("RGB").tobytes(), name


def test_data_uris() -> None:
    raw = png(4)
    assert item_bytes(data_uri(raw), FetchPolicy()) == raw
    assert item_bytes("data:,%89PNG", FetchPolicy()) == b"\x89PNG"
    bad = item_bytes("data:image/png;base64,***", FetchPolicy())
    assert isinstance(bad, ItemError) and bad.status == 400


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://example.com/x.png")
            self.end_headers()
            return
        body = png(5) if self.path == "/ok.png" else b"x" * 100_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_urls_are_off_by_default(server: str) -> None:
    err = item_bytes(server + "/ok.png", FetchPolicy())
    assert isinstance(err, ItemError) and "disabled" in err.message


def test_url_fetch_with_allow_list_size_cap_and_no_redirects(server: str) -> None:
    policy = FetchPolicy(enabled=True, allow_hosts=("127.0.0.1",), max_bytes=50_000, timeout_s=2)
    assert item_bytes(server + "/ok.png", policy) == png(5)
    too_big = item_bytes(server + "/big", policy)
    assert isinstance(too_big, ItemError) and too_big.status == 413
    redirect = item_bytes(server + "/redirect", policy)
    assert isinstance(redirect, ItemError) and redirect.status == 400
    other = item_bytes(server.replace("127.0.0.1", "localhost") + "/ok.png", policy)
    assert isinstance(other, ItemError) and "allow-list" in other.message

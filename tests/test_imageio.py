"""Image item decoding and fetching, in-process: every failure is one item's clear error."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from images import bomb_png, data_uri, encode, jpeg, picture, png
from PIL import Image

from zembed.engines.imageio import DecodeLimits, FetchPolicy, decode, item_bytes
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

"""Test images made in memory: photo-like pictures in every accepted format, and bad ones."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, width: int = 96, height: int = 72) -> Image.Image:
    """A smooth, noisy RGB picture; different seeds give visibly different pictures."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    base = np.stack([np.sin(x / (7 + seed) + phase[0]), np.cos(y / (5 + seed) + phase[1]),
                     np.sin((x + y) / 9 + phase[2])], axis=-1)
    pixels = np.clip(127 + 100 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, width: int = 96, height: int = 72) -> bytes:
    return encode(picture(seed, width, height), "JPEG", quality=90)


def png(seed: int) -> bytes:
    return encode(picture(seed), "PNG")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    raw = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8  # signature, then the IHDR chunk: length(4) type(4) data(13) crc(4)
    raw[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(raw[ihdr + 4:ihdr + 21])) & 0xFFFFFFFF
    raw[ihdr + 21:ihdr + 25] = struct.pack(">I", crc)
    return bytes(raw)


def _sof_offset(data: bytes) -> int:
    """Offset of a JPEG's SOF0/1/2 marker (where its size is written)."""
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    return i


def lying_jpeg(width: int, height: int, data: bytes | None = None) -> bytes:
    """A JPEG (64x64 of data by default) whose header claims ``width`` x ``height`` pixels.

    libjpeg decodes it without an error, padding what the data does not cover with grey.
    """
    raw = bytearray(data if data is not None else jpeg(11, 64, 64))
    at = _sof_offset(bytes(raw))
    raw[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def cut_with_eoi(data: bytes, keep: float) -> bytes:
    """A JPEG cut after ``keep`` of its scan data, then given an end marker (FF D9): a file cut
    short and 'repaired' the way Pillow's LOAD_TRUNCATED_IMAGES repairs it."""
    scan = data.rfind(b"\xff\xda")
    start = scan + 2 + struct.unpack_from(">H", data, scan + 2)[0]
    end = len(data) - 2  # the encoders used here end the scan right at FF D9
    cut = start + int((end - start) * keep)
    if data[cut - 1] == 0xFF:  # do not leave half of a stuffed FF 00
        cut -= 1
    return data[:cut] + b"\xff\xd9"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path

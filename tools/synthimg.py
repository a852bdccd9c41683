"""Photo-like JPEGs made with numpy alone (no Pillow, no torch), for the bench and its inputs.

A client-only install (``pip install zembed``) runs ``zembed bench --kind image``, so its test
images cannot come from Pillow. This is a small baseline JPEG encoder: YCbCr with 4:2:0
chroma (as libjpeg's default), the usual quantisation tables scaled like libjpeg's ``quality``,
and one flat Huffman table per class (every DC symbol 4 bits, every AC symbol 8 bits), so no
table has to be copied out of the standard. Files come out larger than libjpeg's at the same
quality; any baseline decoder (Pillow, libjpeg-turbo, nvJPEG) reads them. Everything is
vectorised: a 640x480 image takes well under a tenth of a second.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

_LUMA_Q = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.float64).reshape(8, 8)
_CHROMA_Q = np.full((8, 8), 99.0)
_CHROMA_Q[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

#: Row-major index of the n-th coefficient in zig-zag order.
_ZIGZAG = np.array(sorted(range(64), key=lambda i: (i // 8 + i % 8,
                                                   i // 8 if (i // 8 + i % 8) % 2 else -(i // 8))))

#: Orthonormal 8-point DCT-II matrix: the 2-D DCT of a block is D @ block @ D.T (JPEG's FDCT).
_DCT = np.array([[np.sqrt((1 if u == 0 else 2) / 8) * np.cos((2 * x + 1) * u * np.pi / 16)
                  for x in range(8)] for u in range(8)])

_AC_SYMBOLS = [0x00, 0xF0] + [(run << 4) | size for run in range(16) for size in range(1, 11)]
#: Flat canonical Huffman codes: symbol -> code (DC: 12 codes of 4 bits; AC: 162 of 8 bits).
_AC_CODE = np.zeros(256, dtype=np.int64)
_AC_CODE[_AC_SYMBOLS] = np.arange(len(_AC_SYMBOLS))
_DC_BITS, _AC_BITS = 4, 8


def synthetic_pixels(width: int, height: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """A photo-like RGB picture (smooth gradients plus noise), ``(height, width, 3)`` uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    noise = rng.normal(0, 12, (height, width, 3))
    return np.clip(base + noise + rng.uniform(0, 55, 3), 0, 255).astype(np.uint8)


def synthetic_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG of the given size, made in memory without Pillow."""
    return encode_jpeg(synthetic_pixels(width, height, seed), quality)


def _tables(quality: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    quality = min(max(quality, 1), 100)
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    luma, chroma = (np.clip(np.floor((t * scale + 50) / 100), 1, 255).astype(np.int64)
                    for t in (_LUMA_Q, _CHROMA_Q))
    return luma, chroma


def _blocks(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """Level-shifted blocks in scan order: per 16x16 MCU, four Y blocks, then Cb and Cr (4:2:0)."""
    h, w = pixels.shape[:2]
    padded = np.pad(pixels, ((0, -h % 16), (0, -w % 16), (0, 0)), mode="edge").astype(np.float64)
    r, g, b = padded[..., 0], padded[..., 1], padded[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b - 128
    mh, mw = luma.shape[0] // 16, luma.shape[1] // 16
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    ys = luma.reshape(mh, 2, 8, mw, 2, 8).transpose(0, 3, 1, 4, 2, 5).reshape(mh, mw, 4, 8, 8)
    chroma = [c.reshape(mh, 8, 2, mw, 8, 2).mean(axis=(2, 5)).reshape(mh, 8, mw, 8)
              .transpose(0, 2, 1, 3).reshape(mh, mw, 1, 8, 8) for c in (cb, cr)]
    return np.concatenate([ys, *chroma], axis=2).reshape(-1, 8, 8)


def _size(values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """JPEG magnitude category: the bit length of ``|v|``."""
    mags = np.abs(values)
    out = np.zeros(mags.shape, dtype=np.int64)
    nonzero = mags > 0
    out[nonzero] = np.floor(np.log2(mags[nonzero])).astype(np.int64) + 1
    return out


def _bits(values: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The ``size`` low bits JPEG sends for a value (negative ones as ones' complement)."""
    return np.where(values >= 0, values, values + (1 << sizes) - 1)


#: Component (0 Y, 1 Cb, 2 Cr) of each of the six blocks of an MCU.
_MCU_COMPONENTS = np.array([0, 0, 0, 0, 1, 2])


def _scan(coefs: npt.NDArray[np.int64]) -> bytes:
    """Entropy-coded scan data of zig-zag ordered, quantised blocks in MCU order."""
    n = len(coefs)
    comp = np.tile(_MCU_COMPONENTS, n // len(_MCU_COMPONENTS))
    diff = np.empty(n, dtype=np.int64)
    for c in range(3):  # DC is sent as the difference to the same component's previous block
        diff[comp == c] = np.diff(coefs[comp == c, 0], prepend=0)
    # Every piece of the stream is (sort key, value, bit count); the key orders them. A
    # Huffman code and the value bits after it go as one piece (at most 8 + 10 bits).
    dc_size = _size(diff)
    keys = [np.arange(n, dtype=np.int64) * 1024]
    vals = [(dc_size << dc_size) | _bits(diff, dc_size)]
    lens = [_DC_BITS + dc_size]
    rows, cols = np.nonzero(coefs[:, 1:])
    pos = cols + 1
    values = coefs[rows, pos]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    prev = np.where(first, 0, np.concatenate([[0], pos[:-1]]))
    run = pos - prev - 1
    size = _size(values)
    zrl_at = np.repeat(np.arange(len(rows)), run // 16)  # a run of 16 zeros has its own code
    keys.append(rows[zrl_at] * 1024 + pos[zrl_at] * 2)
    vals.append(np.full(len(zrl_at), _AC_CODE[0xF0]))
    lens.append(np.full(len(zrl_at), _AC_BITS))
    keys.append(rows * 1024 + pos * 2 + 1)
    vals.append((_AC_CODE[((run % 16) << 4) | size] << size) | _bits(values, size))
    lens.append(_AC_BITS + size)
    eob = np.nonzero(coefs[:, 63] == 0)[0]  # a block whose last coefficient is 0 ends with EOB
    keys.append(eob * 1024 + 200)
    vals.append(np.full(len(eob), _AC_CODE[0x00]))
    lens.append(np.full(len(eob), _AC_BITS))
    order = np.argsort(np.concatenate(keys), kind="stable")
    val, length = np.concatenate(vals)[order], np.concatenate(lens)[order]
    # Pieces never share a bit, so adding their bytes is OR-ing them: each piece (at most 18
    # bits, starting at bit 0-7 of its first byte) is spread over a 4-byte window.
    start = np.cumsum(length) - length
    first_byte, offset = start // 8, start % 8
    window = val << (32 - offset - length)
    total = int((start[-1] + length[-1] + 7) // 8) if len(length) else 0
    data = np.zeros(total + 4, dtype=np.int64)
    for k in range(4):
        part = (window >> (24 - 8 * k)) & 0xFF
        data += np.bincount(first_byte + k, weights=part, minlength=total + 4).astype(np.int64)
    used = int(start[-1] + length[-1]) if len(length) else 0
    if used % 8:  # pad the last byte with 1 bits
        data[used // 8] |= (1 << (8 - used % 8)) - 1
    out = data[:total].astype(np.uint8)
    ff = np.nonzero(out == 0xFF)[0]
    return np.insert(out, ff + 1, 0).tobytes()  # byte stuffing: 0xFF -> 0xFF 0x00


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def encode_jpeg(pixels: npt.NDArray[np.uint8], quality: int = 90) -> bytes:
    """A baseline JPEG of an RGB ``(height, width, 3)`` uint8 array."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError("encode_jpeg takes a (height, width, 3) uint8 array")
    h, w = pixels.shape[:2]
    if not (0 < h < 65536 and 0 < w < 65536):
        raise ValueError(f"a JPEG is 1 to 65535 pixels a side, not {w}x{h}")
    luma, chroma = _tables(quality)
    blocks = _DCT @ _blocks(pixels) @ _DCT.T
    quant = np.stack([luma, chroma])[np.tile(_MCU_COMPONENTS, len(blocks) // 6).clip(0, 1)]
    coefs = np.rint(blocks / quant).astype(np.int64).reshape(-1, 64)[:, _ZIGZAG]
    coefs[:, 1:] = np.clip(coefs[:, 1:], -1023, 1023)
    dc_counts = [0, 0, 0, 12] + [0] * 12
    ac_counts = [0] * 7 + [len(_AC_SYMBOLS)] + [0] * 8
    return b"".join([
        b"\xff\xd8",
        _segment(0xFFE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
        _segment(0xFFDB, b"".join(bytes([t]) + table.reshape(-1)[_ZIGZAG].astype(np.uint8).tobytes()
                                  for t, table in enumerate((luma, chroma)))),
        _segment(0xFFC0, struct.pack(">BHHB", 8, h, w, 3)
                 + bytes([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1])),
        _segment(0xFFC4, bytes([0x00, *dc_counts, *range(12)])
                 + bytes([0x10, *ac_counts, *_AC_SYMBOLS])),
        _segment(0xFFDA, bytes([3, 1, 0x00, 2, 0x00, 3, 0x00, 0, 63, 0])),
        _scan(coefs),
        b"\xff\xd9",
    ])

"""Turning image items into pictures: bytes, ``data:`` URIs and (opt-in) http(s) URLs.

Everything here runs on the engine's decode pool, never on the socket thread. Each failure is
an :class:`ItemError` for that item alone, with a status a client can act on: 400 for data
that is not a supported, intact image; 413 for one over the size or pixel limits.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError

from zembed import protocol as p
from zembed.engines.model import ItemError

#: Formats a search service sends; anything else is refused rather than half-supported.
FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})

# We check the pixel count from the header ourselves (a per-item 413) before any decoding,
# so Pillow's own global bomb check, which raises or warns process-wide, is not needed.
Image.MAX_IMAGE_PIXELS = None

# With this on, Pillow ends a JPEG that stops early with a made-up end marker and libjpeg pads
# the rest with grey: a truncated image would be embedded as if it were whole. Off (Pillow's
# default, restated because any library in the process could turn it on), data that stops
# early raises "image file is truncated" in load(), which is that item's 400.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: The end of a JPEG scan's entropy-coded data: a 0xFF that is not byte stuffing (FF 00), a
#: restart marker (FF D0-D7) or a fill byte (FF FF), i.e. the next real marker.
_SCAN_END = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
#: Zero bytes after a sequential JPEG's last scan, in place of its end marker (see
#: :func:`strict_jpeg`): libjpeg(-turbo) reads up to 8 bytes ahead of the bits it decodes.
_LOOKAHEAD_PAD = b"\x00" * 16
#: Markers (and fill bytes) :func:`jpeg_layout` walks at most; a progressive JPEG has about
#: ten scans and a few dozen segments in all.
_MAX_MARKERS = 2000
#: SOF markers of the Huffman-coded processes: sequential (baseline, extended), progressive.
_SOF_SEQUENTIAL = (0xC0, 0xC1)
_SOF_PROGRESSIVE = 0xC2


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What an image may be, and how to decode it."""

    max_pixels: int = 40_000_000
    min_side: int = 8
    draft: bool = True
    #: The model's input side; JPEG draft decoding never goes below it.
    target: int = 224


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Whether and where http(s) image URLs may be fetched."""

    enabled: bool = False
    allow_hosts: tuple[str, ...] = ()
    max_bytes: int = 10 << 20
    timeout_s: float = 5.0


def item_bytes(item: Any, fetch: FetchPolicy) -> bytes | ItemError:
    """The encoded image of a wire item: bytes as they are, ``data:`` decoded, URLs fetched."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str) and item.startswith("data:"):
        return _data_uri(item)
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        return _fetch(item, fetch)
    return ItemError(p.BAD_REQUEST, "an image item must be bytes, a data: URI or an http(s) URL")


def _data_uri(uri: str) -> bytes | ItemError:
    meta, sep, payload = uri[5:].partition(",")
    if not sep:
        return ItemError(p.BAD_REQUEST, "malformed data: URI (no comma)")
    try:
        if meta.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        return ItemError(p.BAD_REQUEST, f"malformed data: URI ({exc})")


def _fetch(url: str, policy: FetchPolicy) -> bytes | ItemError:
    if not policy.enabled:
        return ItemError(p.BAD_REQUEST, "fetching image URLs is disabled on this engine")
    host = urllib.parse.urlsplit(url).hostname or ""
    if host not in policy.allow_hosts:
        return ItemError(p.BAD_REQUEST, f"host {host!r} is not in this engine's fetch allow-list")
    try:
        # No redirects to other hosts: a redirect is refused like any other non-200 answer.
        opener = urllib.request.build_opener(_NoRedirect)
        with opener.open(url, timeout=policy.timeout_s) as resp:
            data: bytes = resp.read(policy.max_bytes + 1)
    except Exception as exc:  # urllib raises many types; the item fails, the engine goes on
        return ItemError(p.BAD_REQUEST, f"could not fetch {url[:200]}: {exc}")
    if len(data) > policy.max_bytes:
        return ItemError(p.TOO_LARGE, f"{url[:200]} is over {policy.max_bytes} bytes")
    return data


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def decode(data: bytes, limits: DecodeLimits) -> Image.Image | ItemError:
    """Open, check and decode an encoded image to RGB; never raises for bad data."""
    img = open_checked(data, limits)
    return img if isinstance(img, ItemError) else load_rgb(img, limits)


def open_checked(data: bytes, limits: DecodeLimits) -> Image.Image | ItemError:
    """Read the header only and apply the limits (format, pixel count, smallest side).

    Every decoder, PIL's or the GPU's (engines/gpudecode.py), starts from here, so a
    decompression bomb is refused before any pixel is decoded. The image is not decoded yet:
    its ``format`` says which decoder may take it, :func:`load_rgb` decodes it with PIL.
    A JPEG's scans are also measured against its header here (:func:`check_jpeg`), so one whose
    header promises more pixels than its data can hold is refused whichever decoder would run.
    """
    if not data:
        return ItemError(p.BAD_REQUEST, "empty image (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=list(FORMATS))  # reads the header only
    except UnidentifiedImageError:
        return ItemError(p.BAD_REQUEST, "not a JPEG, PNG, WebP, GIF or BMP image")
    except Exception as exc:
        return ItemError(p.BAD_REQUEST, f"corrupt image header: {exc}")
    width, height = img.size
    if width * height > limits.max_pixels:
        return ItemError(p.TOO_LARGE,
                         f"{width}x{height} pixels, at most {limits.max_pixels} allowed")
    if min(width, height) < limits.min_side:
        return ItemError(p.BAD_REQUEST,
                         f"{width}x{height} is too small (sides of {limits.min_side}+ needed)")
    if img.format != "JPEG":
        return img
    checked = check_jpeg(data)
    if isinstance(checked, ItemError):
        return checked
    if checked is data:
        return img
    try:  # the same header, so nothing above changes; only where the data ends does
        return Image.open(io.BytesIO(checked), formats=["JPEG"])
    except Exception as exc:
        return ItemError(p.BAD_REQUEST, f"corrupt image header: {exc}")


def load_rgb(img: Image.Image, limits: DecodeLimits) -> Image.Image | ItemError:
    """Decode an image from :func:`open_checked` to RGB with PIL (JPEG draft where allowed).

    Draft mode only scales the IDCT output: libjpeg still entropy-decodes every block, so data
    that stops early raises here as it does at full size (tests/test_imageio.py checks both).
    """
    try:
        if limits.draft and img.format == "JPEG":
            img.draft("RGB", (limits.target, limits.target))
        return img.convert("RGB")  # GIF: the first frame; decoding happens here
    except Exception as exc:  # truncated or corrupt data
        return ItemError(p.BAD_REQUEST, f"truncated or corrupt {img.format} image: {exc}")


@dataclass(frozen=True, slots=True)
class JpegScan:
    """One scan (SOS segment) of a JPEG: what it codes and how much data it carries."""

    components: tuple[int, ...]
    #: A progressive scan's first DC pass (Ss = 0, Ah = 0): one Huffman code per block at least.
    dc_first: bool
    #: Bytes from the end of the SOS header to the marker that ends the scan. Stuffed zero
    #: bytes and restart markers are in it (under 1 % of a photo's scan): a floor measured
    #: against it only errs towards accepting.
    data_bytes: int
    #: Offset of the marker that ends the scan; ``None`` when the data ends inside the scan.
    end: int | None


@dataclass(frozen=True, slots=True)
class JpegLayout:
    """What a JPEG's markers say: coding process (its SOF marker), size, sampling, scans."""

    sof: int
    width: int
    height: int
    #: Component id -> (horizontal, vertical) sampling factor.
    sampling: dict[int, tuple[int, int]]
    scans: tuple[JpegScan, ...]

    def blocks(self, component: int) -> int:
        """8x8 blocks of one component, without MCU padding (so a lower bound)."""
        h, v = self.sampling.get(component, (1, 1))
        hmax = max(f[0] for f in self.sampling.values())
        vmax = max(f[1] for f in self.sampling.values())
        cols = math.ceil(math.ceil(self.width * h / hmax) / 8)
        rows = math.ceil(math.ceil(self.height * v / vmax) / 8)
        return cols * rows

    def min_bits(self, scan: JpegScan) -> int:
        """The fewest entropy-coded bits a complete ``scan`` can have.

        Huffman codes are at least one bit long. A sequential scan codes every block with a DC
        code and either an end-of-block code or AC codes up to the 64th coefficient: 2 bits at
        least. A progressive first DC scan codes one DC code per block: 1 bit. Other progressive
        scans can cover thousands of blocks with one end-of-band run, and arithmetic coding has
        no such floor: 0.
        """
        if self.sof in _SOF_SEQUENTIAL:
            per_block = 2
        elif self.sof == _SOF_PROGRESSIVE and scan.dc_first:
            per_block = 1
        else:
            return 0
        return per_block * sum(self.blocks(c) for c in scan.components)


def jpeg_layout(data: bytes) -> JpegLayout | None:
    """Walk a JPEG's markers; ``None`` where they do not parse (the decoder then judges it)."""
    sof = width = height = 0
    sampling: dict[int, tuple[int, int]] = {}
    scans: list[JpegScan] = []
    i, size = 2, len(data)
    try:
        for _ in range(_MAX_MARKERS):
            if i + 4 > size or data[i] != 0xFF:
                break
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte before a marker
                i += 1
                continue
            if marker == 0xD9:  # EOI
                break
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            (length,) = struct.unpack_from(">H", data, i + 2)
            seg = data[i + 4:i + 2 + length]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
                sof = marker
                height, width = struct.unpack_from(">HH", seg, 1)
                sampling = {seg[6 + 3 * k]: (seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15)
                            for k in range(seg[5])}
            elif marker == 0xDA:  # SOS: the header, then entropy-coded data up to a marker
                count = seg[0]
                start = i + 2 + length
                found = _SCAN_END.search(data, start)
                end = found.start() if found else None
                stop = size if end is None else end
                scans.append(JpegScan(
                    components=tuple(seg[1:1 + 2 * count:2]),
                    dc_first=seg[1 + 2 * count] == 0 and seg[3 + 2 * count] >> 4 == 0,
                    data_bytes=stop - start,
                    end=end))
                i = stop
                continue
            i += 2 + length
        else:  # no real JPEG has that many; walking them all would cost seconds in Python
            return None
    except (IndexError, struct.error):
        return None
    if not (sof and sampling and scans) or 0 in [f for hv in sampling.values() for f in hv]:
        return None
    return JpegLayout(sof, width, height, sampling, tuple(scans))


def check_jpeg(data: bytes) -> bytes | ItemError:
    """Refuse a JPEG whose scans are too short for its header; else the bytes to decode.

    libjpeg does not fail on a scan that ends early at a marker (a file cut short and given an
    end marker, or a header edited to claim 6000x6000 over 64x64 of data): it warns, which
    Pillow discards, and fills the rest of the picture with grey. So:

    * any scan carrying fewer bits than the blocks it must code (:meth:`JpegLayout.min_bits`)
      is a 400 here, before any decoder runs, on the CPU and the GPU path alike;
    * a sequential JPEG is decoded from its bytes up to the end of its last scan, followed by
      zero bytes for libjpeg's read-ahead instead of the end marker. A complete scan decodes to
      the same pixels; one that stops early makes libjpeg ask for more data, and Pillow's
      load() raises "image file is truncated" (16 zero bytes still decode as at most 64 blocks
      of the last MCUs, so a cut within those few blocks can get past).

    Progressive JPEGs need their end marker to finish; they get the first check only.
    """
    layout = jpeg_layout(data)
    if layout is None:
        return data
    for scan in layout.scans:
        need = layout.min_bits(scan)
        if scan.data_bytes * 8 < need:
            return ItemError(
                p.BAD_REQUEST,
                f"truncated or corrupt JPEG image: its header says {layout.width}x"
                f"{layout.height} pixels, but a scan carries {scan.data_bytes} bytes, fewer than "
                f"the {math.ceil(need / 8)} that many pixels need at least")
    last_end = layout.scans[-1].end
    if layout.sof not in _SOF_SEQUENTIAL or last_end is None:
        return data
    return data[:last_end] + _LOOKAHEAD_PAD

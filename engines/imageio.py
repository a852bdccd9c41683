"""Turning image items into pictures: bytes, ``data:`` URIs and (opt-in) http(s) URLs.

Everything here runs on the engine's decode pool, never on the socket thread. Each failure is
an :class:`ItemError` for that item alone, with a status a client can act on: 400 for data
that is not a supported, intact image; 413 for one over the size or pixel limits.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from zembed import protocol as p
from zembed.engines.model import ItemError

#: Formats a search service sends; anything else is refused rather than half-supported.
FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})

# We check the pixel count from the header ourselves (a per-item 413) before any decoding,
# so Pillow's own global bomb check, which raises or warns process-wide, is not needed.
Image.MAX_IMAGE_PIXELS = None


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
    return img


def load_rgb(img: Image.Image, limits: DecodeLimits) -> Image.Image | ItemError:
    """Decode an image from :func:`open_checked` to RGB with PIL (JPEG draft where allowed)."""
    try:
        if limits.draft and img.format == "JPEG":
            img.draft("RGB", (limits.target, limits.target))
        return img.convert("RGB")  # GIF: the first frame; decoding happens here
    except Exception as exc:  # truncated or corrupt data
        return ItemError(p.BAD_REQUEST, f"corrupt {img.format} image: {exc}")

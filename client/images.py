"""Client-side image items: what ``embed_images`` accepts, turned into what the wire carries.

Paths are read here, on the client; PIL images and numpy arrays are encoded here as PNG
(lossless, so the engine sees exactly those pixels). ``data:`` URIs and http(s) URLs pass
through as text for the engine to decode or fetch (fetching is off unless the engine allows it).

Bytes, paths and URIs need nothing beyond ``pip install zembed``; numpy arrays are encoded with
Pillow, which ``pip install 'zembed[images]'`` brings (a PIL image means Pillow is there).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

from zembed.errors import BadRequest

_URI_PREFIXES = ("data:", "http://", "https://")


def image_item(image: Any) -> bytes | str:
    """One image as a wire item (bytes, or a data:/http(s) string)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, str) and image.startswith(_URI_PREFIXES):
        return image
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as fh:
            return fh.read()
    if hasattr(image, "__array_interface__") and not hasattr(image, "save"):
        try:
            from PIL import Image
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "sending a numpy array as an image needs Pillow: pip install 'zembed[images]' "
                "(or send encoded bytes or a path)", name="PIL") from None
        image = Image.fromarray(image)
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise BadRequest(f"cannot send a {type(image).__name__} as an image: give bytes, a path, "
                     "a data:/http(s) URI, a PIL image or a uint8 numpy array")


def image_items(images: Sequence[Any]) -> list[bytes | str]:
    """All images of a request as wire items."""
    if isinstance(images, (bytes, str)) or hasattr(images, "save"):
        raise BadRequest("images must be a sequence of images, not a single image")
    return [image_item(img) for img in images]

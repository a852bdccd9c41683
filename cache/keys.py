"""Cache keys: everything that changes a vector is in the key, so a stale vector is never served.

``{prefix}:v1:{kind}:{fingerprint}:{n|r}[@{d}]:{input_type|-}:{blake2b-128 of the item}``

- ``kind``: text, clip-text or image (the two CLIP towers never share entries);
- ``fingerprint``: the engine's model fingerprint for that kind (model, weights hash, dim,
  pooling, max length, prompt prefixes, dtype);
- ``n``/``r``: normalised or raw; ``n@{d}``/``r@{d}`` for a vector truncated to its first ``d``
  dimensions (a request's ``dimensions`` below the model's dim). A full-dimension vector keeps
  the plain flag, so the keys written before truncation existed stay valid;
- ``input_type``: which named prompt the engine applied (``query``, ``document`` or another of
  the model's prompts), ``-`` if none;
- the content hash: of the exact UTF-8 bytes of a text, the bytes of an image, or the UTF-8 of a
  ``data:`` URI. http(s) URL items are never cached: what a URL serves can change.

``docs/cache.md`` documents the layout so other services can read the cache.
"""

from __future__ import annotations

import hashlib
from typing import Any

KEY_VERSION = "v1"
DEFAULT_PREFIX = "zembed"


def content_hash(item: Any) -> bytes | None:
    """blake2b-128 hex of an item's content, or None for items that must not be cached."""
    if isinstance(item, str):
        if item.startswith(("http://", "https://")):
            return None
        data = item.encode("utf-8", "surrogatepass")
    elif isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    else:
        return None
    return hashlib.blake2b(data, digest_size=16).hexdigest().encode()


def key_prefix(prefix: str, kind: str, fingerprint: str, normalize: bool,
               input_type: str | None, dimensions: int | None = None) -> bytes:
    """Everything of a key but the content hash (shared by all items of a request).

    ``dimensions`` is the truncated width, or None for the model's full dim: the broker passes
    None when a request asks for the full dim, so both forms share one entry.
    """
    flag = "n" if normalize else "r"
    if dimensions is not None:
        flag = f"{flag}@{dimensions}"
    return f"{prefix}:{KEY_VERSION}:{kind}:{fingerprint}:{flag}:{input_type or '-'}:".encode()


def item_keys(prefix: bytes, items: list[Any]) -> list[bytes | None]:
    """The key of each item (None where the item is not cacheable)."""
    out: list[bytes | None] = []
    for item in items:
        digest = content_hash(item)
        out.append(None if digest is None else prefix + digest)
    return out


def fingerprint_pattern(prefix: str, kind: str | None, fingerprint: str | None) -> str:
    """SCAN pattern for purging by kind and/or fingerprint."""
    return f"{prefix}:{KEY_VERSION}:{kind or '*'}:{fingerprint or '*'}:*"

"""Cache values: one BF16 vector with a small header that catches corrupt or foreign entries.

Layout (little-endian)::

    b"ZV" | version u8 (1) | dtype u8 (1 = bf16) | dim u16 | dim x bf16 words

A value whose magic, version, dtype, dim or length is wrong decodes to None: a miss that the
computed vector then overwrites, counted as ``corrupt``.
"""

from __future__ import annotations

import struct

MAGIC = b"ZV"
VERSION = 1
DTYPE_BF16 = 1
_HEADER = struct.Struct("<2sBBH")
HEADER_BYTES = _HEADER.size


def encode_value(words: bytes, dim: int) -> bytes:
    """Frame ``dim`` little-endian BF16 words for storage."""
    return _HEADER.pack(MAGIC, VERSION, DTYPE_BF16, dim) + words


def decode_value(value: bytes, dim: int) -> bytes | None:
    """The BF16 words of a stored value, or None if it is not a valid ``dim``-vector."""
    if len(value) != HEADER_BYTES + 2 * dim:
        return None
    magic, version, dtype, stored_dim = _HEADER.unpack_from(value)
    if magic != MAGIC or version != VERSION or dtype != DTYPE_BF16 or stored_dim != dim:
        return None
    return value[HEADER_BYTES:]

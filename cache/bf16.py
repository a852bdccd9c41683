"""BF16 codec shared by engines and the cache: float32 <-> bfloat16 with round-to-nearest-even.

Every vector zembed returns has gone through :func:`to_bf16` exactly once, in the engine. The
cache stores those same 16-bit words, so a cached vector is bit-identical to a computed one.
Pure numpy integer arithmetic: no optional dependency, and the same bits on every machine.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_EXP_MASK = np.uint32(0x7F800000)
_ABS_MASK = np.uint32(0x7FFFFFFF)
_QUIET_BIT = np.uint16(0x0040)


def to_bf16(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Round float32 values to bfloat16 (round-to-nearest-even), returned as raw uint16 words.

    NaNs stay NaN (made quiet, so rounding never turns them into infinities).
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half-way cases to the even neighbour.
    bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    out = ((bits + bias) >> np.uint32(16)).astype(np.uint16)
    nan = (bits & _ABS_MASK) > _EXP_MASK
    if nan.any():
        out[nan] = (bits[nan] >> np.uint32(16)).astype(np.uint16) | _QUIET_BIT
    return out


def from_bf16(words: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """Widen raw bfloat16 words to float32 (exact: bf16 is the top half of a float32)."""
    return (np.asarray(words, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_bytes_to_f32(buf: bytes | memoryview, shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Decode a little-endian BF16 vector buffer of ``shape`` into a float32 array."""
    words = np.frombuffer(buf, dtype="<u2")
    if words.size != shape[0] * shape[1]:
        raise ValueError(f"buffer holds {words.size} values, shape {shape} needs more or fewer")
    return from_bf16(words).reshape(shape)

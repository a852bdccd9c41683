"""BF16 rounding must be round-to-nearest-even and bit-exact, or cache hits would drift."""

from __future__ import annotations

import numpy as np

from zembed.cache.bf16 import bf16_bytes_to_f32, from_bf16, to_bf16


def f32(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def test_exact_values_round_trip() -> None:
    words = np.arange(0, 0x7F80, 7, dtype=np.uint16)  # positive finite bf16 values
    assert np.array_equal(to_bf16(from_bf16(words)), words)


def test_ties_go_to_even() -> None:
    # 0x3F808000 is exactly half-way between bf16 0x3F80 (even) and 0x3F81 (odd).
    assert to_bf16(np.array([f32(0x3F808000)]))[0] == 0x3F80
    # Half-way between 0x3F81 (odd) and 0x3F82 (even): goes up to the even one.
    assert to_bf16(np.array([f32(0x3F818000)]))[0] == 0x3F82
    # Just above half-way rounds up, just below rounds down.
    assert to_bf16(np.array([f32(0x3F808001)]))[0] == 0x3F81
    assert to_bf16(np.array([f32(0x3F807FFF)]))[0] == 0x3F80


def test_specials() -> None:
    out = to_bf16(np.array([np.inf, -np.inf, np.nan, -0.0], dtype=np.float32))
    assert out[0] == 0x7F80 and out[1] == 0xFF80 and out[3] == 0x8000
    assert np.isnan(from_bf16(out[2:3]))[0]


def test_error_is_within_half_ulp() -> None:
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    back = from_bf16(to_bf16(x))
    rel = np.abs(back - x) / np.abs(x)
    assert rel.max() <= 2.0**-8  # half a step of bf16 7-bit stored mantissa


def test_bytes_to_f32_checks_size() -> None:
    words = to_bf16(np.ones((2, 3), dtype=np.float32)).astype("<u2").tobytes()
    assert bf16_bytes_to_f32(words, (2, 3)).tolist() == [[1.0] * 3] * 2
    try:
        bf16_bytes_to_f32(words, (2, 4))
    except ValueError:
        pass
    else:
        raise AssertionError("a wrong shape must be refused")

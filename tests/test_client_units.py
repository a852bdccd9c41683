"""The SDK's surface and its one retry policy, without processes."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import msgpack
import numpy as np
import pytest

from zembed import protocol as p
from zembed.client.codec import decode_embed, embed_frames, retry_delay
from zembed.errors import BadRequest, EngineUnavailable, Overloaded


def test_sdk_is_importable_from_the_package_without_the_server_stack() -> None:
    code = ("import sys; from zembed import Client, AsyncClient, EmbedResult; "
            "from zembed.client import from_bf16; "
            "print(sorted(m for m in ('torch', 'transformers', 'open_clip', 'redis') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    import zembed

    with pytest.raises(AttributeError):
        _ = zembed.NoSuchThing  # type: ignore[attr-defined]


def test_returned_vectors_are_writable_float32() -> None:
    rows = np.arange(6, dtype="<f4").reshape(2, 3)
    header = msgpack.unpackb(msgpack.packb(
        {"id": 1, "status": 200, "dtype": "f32", "shape": [2, 3], "cached": 0}))
    result = decode_embed(header, rows.tobytes())
    result.vectors /= 2  # a caller normalising in place
    np.testing.assert_array_equal(result.vectors, rows / 2)


@pytest.mark.parametrize(("exc", "base"), [
    (Overloaded("busy", retry_after=0.2), 0.2),
    (EngineUnavailable("no engine"), 0.05 * 2.0**3),
])
def test_retry_delay_is_never_shorter_than_its_base_and_spreads_by_half(
    exc: Overloaded | EngineUnavailable, base: float
) -> None:
    assert retry_delay(exc, 3 if exc.status == p.UNAVAILABLE else 0, 0.05,
                       rand=lambda: 0.0) == pytest.approx(base)
    assert retry_delay(exc, 3 if exc.status == p.UNAVAILABLE else 0, 0.05,
                       rand=lambda: 0.999) == pytest.approx(base * 1.4995)
    delays = {retry_delay(exc, 3 if exc.status == p.UNAVAILABLE else 0, 0.05)
              for _ in range(50)}
    assert len(delays) > 40  # clients refused together do not come back together
    assert all(base <= d < base * 1.5 for d in delays if d is not None)


def test_errors_that_are_not_transient_are_not_retried() -> None:
    assert retry_delay(BadRequest("no"), 0, 0.05) is None


def test_dimensions_go_in_the_header_only_when_given() -> None:
    def sent(**kw: Any) -> dict[str, Any]:
        frames = embed_frames(1, "text", "text", ["a"], normalize=True, dtype="f32",
                              timeout_s=1.0, input_type=None, **kw)
        return msgpack.unpackb(frames[1])  # type: ignore[no-any-return]

    assert "dimensions" not in sent() and "dimensions" not in sent(dimensions=None)
    assert sent(dimensions=256)["dimensions"] == 256
    assert sent(dimensions=np.int64(64))["dimensions"] == 64  # numpy ints are sent as ints
    for bad in (0, -5, True, 1.5, "64"):
        with pytest.raises(BadRequest, match="dimensions must be a positive int"):
            sent(dimensions=bad)


def test_a_truncated_reply_decodes_to_its_own_shape() -> None:
    rows = np.arange(8, dtype="<f4").reshape(4, 2)
    header = {"id": 1, "status": 200, "dtype": "f32", "shape": [4, 2], "cached": 0}
    assert decode_embed(header, rows.tobytes()).vectors.shape == (4, 2)

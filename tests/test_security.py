"""CurveZMQ: only allowed clients may send, only allowed engines may register; keys via keygen."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Stack

from zembed.client import Client
from zembed.errors import ZembedError
from zembed.security import CurveKeyError, keygen


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Key pairs for a broker, a client, an engine and two strangers; allowed-keys dirs."""
    out: dict[str, Path] = {}
    for name in ("broker", "client", "engine", "stranger", "rogue"):
        public, secret = keygen(tmp_path / "keys", name)
        out[name], out[name + "_secret"] = public, secret
    for role, name in (("clients", "client"), ("engines", "engine")):
        folder = tmp_path / role
        folder.mkdir()
        (folder / f"{name}.key").write_bytes(out[name].read_bytes())
        out[role] = folder
    return out


def curve_broker_args(keys: dict[str, Path]) -> list[str]:
    return ["--curve-secret-key", str(keys["broker_secret"]),
            "--curve-clients-dir", str(keys["clients"]),
            "--curve-engines-dir", str(keys["engines"])]


def test_keygen_cli_writes_a_private_pair_and_never_overwrites(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "zembed", "keygen", "node1", "--dir", str(tmp_path)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "node1.key").exists()
    assert (tmp_path / "node1.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "exists already" in again.stderr
    with pytest.raises(CurveKeyError, match="exists already"):
        keygen(tmp_path, "node1")


def test_only_allowed_keys_get_in(stack_factory: Callable[[], Stack],
                                  keys: dict[str, Path]) -> None:
    stack = stack_factory()
    broker = stack.start_broker(*curve_broker_args(keys))
    engine_keys = ["--curve-secret-key", str(keys["engine_secret"]),
                   "--curve-server-key", str(keys["broker"])]
    legit = stack.start_text(*engine_keys)
    rogue = stack.start_text("--curve-secret-key", str(keys["rogue_secret"]),
                             "--curve-server-key", str(keys["broker"]))

    def client(name: str | None) -> Client:
        if name is None:
            return Client(stack.frontend, timeout=1.5)
        return Client(stack.frontend, timeout=10, curve_secret_key=str(keys[name + "_secret"]),
                      curve_server_key=str(keys["broker"]))

    with client("client") as good:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # stats over CURVE: the allowed engine registers
            engines = good.stats(timeout=2)["lanes"]["text"]["engines"]
            if engines:
                break
            time.sleep(0.2)
        assert good.embed_texts(["over an encrypted, authenticated link"]).shape == (1, 384)

        for name in ("stranger", None):  # an unknown key, and no CURVE at all
            with client(name) as other, pytest.raises(ZembedError):
                other.ping(timeout=1.5)

        # Both engines loaded side by side; give the rogue time to try, then look: it never
        # completes a handshake, so it never registers (and keeps trying, alive).
        time.sleep(5.0)
        assert rogue.alive()
        assert len(good.stats()["lanes"]["text"]["engines"]) == 1
        legit.stop()
        deadline = time.monotonic() + 30
        while good.ready(timeout=2).get("ready") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert good.ready(timeout=2)["missing"] == ["text"]  # the rogue never took the lane
        with pytest.raises(ZembedError) as info:
            good.embed_texts(["nobody allowed is serving"])
        assert info.value.status == 503
    assert broker.alive()


def test_curve_without_allowed_keys_is_refused_at_start(tmp_path: Path,
                                                         keys: dict[str, Path]) -> None:
    out = subprocess.run([sys.executable, "-m", "zembed", "start", "broker",
                          "--frontend", "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0",
                          "--stats-endpoint", "", "--cache", "off",
                          "--curve-secret-key", str(keys["broker_secret"])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "allowed clients' public keys" in out.stderr

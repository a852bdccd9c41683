"""CurveZMQ: only allowed clients may send, only allowed engines may register; keys via keygen."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Stack, wait_until

from zembed.client import Client
from zembed.errors import ZembedError
from zembed.security import (
    REFUSAL_LOG_INTERVAL_S,
    CurveKeyError,
    CurveRefusals,
    arm_client,
    keygen,
)
from zembed.tools.net import loopback_endpoint


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


def test_a_key_allowed_on_both_sockets_is_refused_at_start(keys: dict[str, Path]) -> None:
    """A client key copied into the engines' directory would let that client register as an
    engine; the broker says so in one line and does not start."""
    (keys["engines"] / "copied.key").write_bytes(keys["client"].read_bytes())
    out = subprocess.run([sys.executable, "-m", "zembed", "start", "broker",
                          "--frontend", loopback_endpoint(), "--backend", loopback_endpoint(),
                          "--stats-endpoint", "", "--cache", "off", *curve_broker_args(keys)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if "allowed both as a client" in line]
    assert len(errors) == 1 and "client.key = copied.key" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def _curve_socket(ctx: zmq.Context[Any], endpoint: str, keys: dict[str, Path],
                  name: str | None) -> zmq.Socket[Any]:
    """A DEALER connecting with ``name``'s key pair (no CURVE at all for None)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if name is not None:
        arm_client(sock, str(keys[name + "_secret"]), str(keys["broker"]))
    sock.connect(endpoint)
    return sock


def test_refused_handshakes_are_logged_rate_limited_counted_and_not_clients(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    frontend, backend = loopback_endpoint(), loopback_endpoint()
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log_file:
        broker = subprocess.Popen(
            [sys.executable, "-m", "zembed", "start", "broker", "--frontend", frontend,
             "--backend", backend, "--lanes", "text", "--cache", "off", "--stats-endpoint", "",
             *curve_broker_args(keys)], stdout=log_file, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    socks: list[zmq.Socket[Any]] = []
    try:
        with Client(frontend, timeout=5, curve_secret_key=str(keys["client_secret"]),
                    curve_server_key=str(keys["broker"])) as good:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    good.ping(timeout=1)
                    break
                except ZembedError:
                    assert broker.poll() is None, log_path.read_text()
            started = time.monotonic()
            # The usual mix-up first (an engine's key used by a client), then strangers, a
            # client key trying to register as an engine, and a peer without CURVE at all.
            socks.append(_curve_socket(ctx, frontend, keys, "engine"))
            wait_until(lambda: "is an allowed engine key (engine.key)" in log_path.read_text())
            socks += [_curve_socket(ctx, frontend, keys, "stranger") for _ in range(3)]
            socks.append(_curve_socket(ctx, backend, keys, "client"))
            socks.append(_curve_socket(ctx, frontend, keys, None))

            def broker_facts() -> dict[str, Any]:
                facts: dict[str, Any] = good.stats(timeout=2)["broker"]
                return facts

            wait_until(lambda: broker_facts()["curve_refused"]["frontend"] >= 4
                       and broker_facts()["curve_refused"]["backend"] >= 1
                       and broker_facts()["handshakes_failed"] >= 5, timeout=20)
            facts = broker_facts()
            elapsed = time.monotonic() - started
        # Refused peers are not clients: one connection, the good client's, was ever accepted.
        assert facts["clients_accepted"] == 1 and facts["connected_clients"] == 1, facts
        assert facts["handshakes_failed"] >= facts["curve_refused"]["frontend"] + 1  # + no CURVE
        text = log_path.read_text()
        front = [ln for ln in text.splitlines() if "refused a handshake on the frontend" in ln]
        back = [ln for ln in text.splitlines() if "refused a handshake on the backend" in ln]
        windows = 1 + int(elapsed // REFUSAL_LOG_INTERVAL_S)
        assert 1 <= len(front) <= windows and 1 <= len(back) <= windows, text
        assert all("WARNING" in ln and "127.0.0.1" in ln for ln in front + back)
        assert "is an allowed client key (client.key), not in" in back[0]
        assert broker.poll() is None
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(5)


def test_refusal_log_is_rate_limited_per_socket_and_address() -> None:
    """The rate limit alone, on a fake clock: one line per socket and address per interval,
    each later line counting what it stood for; a flood of addresses cannot grow the table."""
    now = [0.0]
    refusals = CurveRefusals({"frontend": "/c", "backend": "/e"}, interval_s=10, max_peers=2,
                             clock=lambda: now[0])
    refusals.know("engine", {b"E" * 40: "engine.key"})
    first = refusals.refused("frontend", "10.0.0.1", b"K" * 40)
    assert first is not None and "10.0.0.1" in first and "not an allowed key, not in /c" in first
    assert refusals.refused("frontend", "10.0.0.1", b"K" * 40) is None
    engine_key = refusals.refused("backend", "10.0.0.1", b"E" * 40)  # another socket: logged
    assert engine_key is not None and "an allowed engine key (engine.key)" in engine_key
    now[0] = 4.0
    for _ in range(5):
        assert refusals.refused("frontend", "10.0.0.1", b"K" * 40) is None
    assert refusals.refused("frontend", "10.0.0.2", b"K" * 40) is None  # table full (2 peers)
    now[0] = 10.5
    again = refusals.refused("frontend", "10.0.0.1", b"K" * 40)
    assert again is not None and "(6 more from this address not logged" in again
    assert "(1 from other addresses not logged" in again
    assert refusals.counts == {"frontend": 9, "backend": 1}
    assert refusals.unlogged == 7

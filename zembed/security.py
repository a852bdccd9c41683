"""CurveZMQ for zembed's sockets: key files, the broker's authenticator, and socket set-up.

Why CURVE: the broker trusts whatever registers on its backend to compute vectors, and whatever
connects to its frontend to spend model time. With CURVE on, every connection is encrypted and
the broker checks the peer's public key against a directory of allowed keys (ZAP), per socket:
one directory for clients, one for engines. A peer whose key is not there never completes the
handshake, so it can neither send a request nor register, and a rogue engine can never receive
traffic or answer with its own vectors.

Keys are the pyzmq/zeromq certificate files that ``zembed keygen`` writes: ``NAME.key`` (public,
safe to copy into an allowed-keys directory) and ``NAME.key_secret`` (keep it private).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("zembed.security")

#: ZAP domains of the broker's two ROUTER sockets, so each has its own allowed keys.
FRONTEND_DOMAIN = "zembed-frontend"
BACKEND_DOMAIN = "zembed-backend"


class CurveKeyError(ValueError):
    """A key file is missing, unreadable or of the wrong kind (clear message for the CLI)."""


def keygen(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``name.key`` and ``name.key_secret`` in ``directory``; return (public, secret).

    Refuses to overwrite an existing pair: replacing a key locks out every peer that trusts it.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise CurveKeyError(f"{public} or {secret} exists already; pick another name or directory")
    made_public, made_secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE secret key {path!r}: {exc}") from None
    if not secret:
        raise CurveKeyError(f"{path!r} holds no secret key; give the .key_secret file")
    return public, secret


def load_public(path: str) -> bytes:
    """The public key of a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE public key {path!r}: {exc}") from None
    return public


def allowed_keys(directory: str) -> int:
    """How many public keys an allowed-keys directory holds (it must exist and hold some)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CurveKeyError(f"allowed-keys directory {directory!r} does not exist")
    count = len(zmq.auth.load_certificates(str(folder)))
    if count == 0:
        raise CurveKeyError(f"allowed-keys directory {directory!r} holds no *.key public keys")
    return count


@dataclass(frozen=True)
class ServerCurve:
    """The broker's CURVE settings: its key pair and one allowed-keys directory per socket."""

    secret_key_file: str
    clients_dir: str
    engines_dir: str


class BrokerAuth:
    """Runs the ZAP authenticator for the broker's context and arms its ROUTER sockets."""

    def __init__(self, ctx: zmq.Context[Any], curve: ServerCurve) -> None:
        self.public, self.secret = load_secret(curve.secret_key_file)
        for label, folder in (("clients", curve.clients_dir), ("engines", curve.engines_dir)):
            if not folder:
                raise CurveKeyError(f"CURVE is on: the directory of allowed {label}' public keys "
                                "must be set too")
            log.info("CURVE: %d allowed %s key(s) in %s", allowed_keys(folder), label, folder)
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve(domain=FRONTEND_DOMAIN, location=curve.clients_dir)
        self.auth.configure_curve(domain=BACKEND_DOMAIN, location=curve.engines_dir)

    def arm(self, sock: zmq.Socket[Any], domain: str) -> None:
        """Make ``sock`` a CURVE server that only admits keys of ``domain``'s directory."""
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)

    def stop(self) -> None:
        self.auth.stop()


def client_keys(secret_key_file: str, server_key_file: str) -> tuple[bytes, bytes, bytes] | None:
    """(public, secret, server public) for a CURVE client, None when CURVE is off.

    Engines call it at start, so a bad key file stops them before the model loads.
    """
    if not secret_key_file and not server_key_file:
        return None
    if not (secret_key_file and server_key_file):
        raise CurveKeyError("CURVE needs both this side's secret key file and the broker's "
                            "public key file")
    public, secret = load_secret(secret_key_file)
    return public, secret, load_public(server_key_file)


def arm_client(sock: zmq.Socket[Any], secret_key_file: str, server_key_file: str) -> None:
    """Make ``sock`` a CURVE client of the broker (no-op when both settings are empty)."""
    keys = client_keys(secret_key_file, server_key_file)
    if keys is None:
        return
    public, secret, server = keys
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)

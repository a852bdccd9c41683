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
import time
from collections.abc import Callable
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
#: Socket names for each ZAP domain, in log lines and in stats (``broker.curve_refused``).
#: The stats PUB socket admits the clients' keys, so its refusals count as the frontend's.
SOCKET_OF_DOMAIN = {FRONTEND_DOMAIN: "frontend", BACKEND_DOMAIN: "backend"}
#: A refused handshake is logged at most once per socket and peer address in this many seconds.
REFUSAL_LOG_INTERVAL_S = 10.0
#: Peer addresses remembered for that rate limit; past it, refusals from new addresses are
#: counted and summed up in the next line logged, not logged one by one.
REFUSAL_LOG_PEERS = 1024


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


def key_files(directory: str) -> dict[bytes, str]:
    """Public key (z85) -> file name, for the ``*.key`` files of an allowed-keys directory
    (the files pyzmq's authenticator loads)."""
    out: dict[bytes, str] = {}
    for path in sorted(Path(directory).glob("*.key")):
        out.setdefault(load_public(str(path)), path.name)
    return out


def check_roles(clients_dir: str, engines_dir: str) -> None:
    """Refuse one public key allowed on both sockets.

    A key in both directories lets its holder register as an engine (receive other clients'
    inputs, answer with its own vectors) as well as send requests, which ``docs/security.md``
    promises a client key cannot do; a broker started that way would break the promise
    silently, so it does not start.
    """
    engines = key_files(engines_dir)
    both = [(name, engines[key]) for key, name in key_files(clients_dir).items()
            if key in engines]
    if both:
        pairs = ", ".join(f"{c} = {e}" for c, e in both[:5])
        raise CurveKeyError(
            f"CURVE: {len(both)} public key(s) allowed both as a client ({clients_dir}) and as "
            f"an engine ({engines_dir}): {pairs}. A key may be allowed on one socket only; "
            "remove it from one of the two directories")


class CurveRefusals:
    """Refused CURVE handshakes: counted per socket, and logged, rate-limited, at WARNING.

    A refusal is invisible otherwise (the peer's libzmq retries quietly, and the broker's loop
    never sees it), yet it is what an operator needs after a key mix-up or a probe. One line
    per socket and peer address per ``interval_s`` keeps a peer that retries every 100 ms, or
    a scan, from flooding the log; each line says how many refusals it stands for. The counts
    are in stats as ``broker.curve_refused``. Runs on the authenticator's thread.
    """

    def __init__(self, dirs: dict[str, str], *, interval_s: float = REFUSAL_LOG_INTERVAL_S,
                 max_peers: int = REFUSAL_LOG_PEERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        #: socket name -> its allowed-keys directory (named in the log line).
        self.dirs = dirs
        self.interval_s = interval_s
        self.max_peers = max_peers
        self.clock = clock
        #: socket name -> handshakes refused since start.
        self.counts = dict.fromkeys(dirs, 0)
        #: Refusals not logged on a line of their own (rate limit).
        self.unlogged = 0
        self._peers: dict[tuple[str, str], tuple[float, int]] = {}
        self._overflow = 0
        self._known: dict[bytes, str] = {}  # key -> "socket/file" where it is allowed

    def know(self, role: str, keys: dict[bytes, str]) -> None:
        """Remember where keys are allowed (``role``: client, engine), so that a key refused on
        the other socket is named as what it is: the usual mix-up, not a stranger."""
        for key, name in keys.items():
            self._known[key] = f"an allowed {role} key ({name})"

    def refused(self, socket: str, address: str, key: bytes) -> str | None:
        """Count a refusal; the line to log, or ``None`` when the rate limit holds it back."""
        self.counts[socket] = self.counts.get(socket, 0) + 1
        now = self.clock()
        peer = (socket, address)
        last = self._peers.get(peer)
        if last is not None and now - last[0] < self.interval_s:
            self._peers[peer] = (last[0], last[1] + 1)
            self.unlogged += 1
            return None
        if last is None and len(self._peers) >= self.max_peers:
            self._peers = {k: v for k, v in self._peers.items() if now - v[0] < self.interval_s}
            if len(self._peers) >= self.max_peers:
                self._overflow += 1
                self.unlogged += 1
                return None
        self._peers[peer] = (now, 0)
        what = self._known.get(key, "not an allowed key")
        line = (f"CURVE: refused a handshake on the {socket} from {address or '?'}: key "
                f"{key.decode('ascii', 'replace')} is {what}, not in {self.dirs.get(socket)}")
        if last is not None and last[1]:
            line += f" ({last[1]} more from this address not logged in the last " \
                    f"{now - last[0]:.0f} s)"
        if self._overflow:
            line += f" ({self._overflow} from other addresses not logged: too many addresses)"
            self._overflow = 0
        return line


class _Authenticator(ThreadAuthenticator):
    """pyzmq's authenticator thread, checking CURVE keys through :class:`CurveRefusals`.

    Keys are checked against the directories read at start (``configure_curve_callback``,
    pyzmq's public hook); the peer's address comes from the ZAP request, which the callback
    does not see, so :meth:`handle_zap_message` notes it first (one request at a time, on
    the one authenticator thread).
    """

    def __init__(self, ctx: zmq.Context[Any], refusals: CurveRefusals) -> None:
        super().__init__(ctx)
        self.refusals = refusals
        self.allowed: dict[str, set[bytes]] = {}
        self._address = ""

    def allow_keys(self, domain: str, keys: set[bytes]) -> None:
        self.allowed[domain] = keys
        self.configure_curve_callback(domain=domain, credentials_provider=self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf8", "replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: is the z85 ``key`` allowed in ``domain``?"""
        if key in self.allowed.get(domain, set()):
            return True
        line = self.refusals.refused(SOCKET_OF_DOMAIN.get(domain, domain), self._address, key)
        if line is not None:
            log.warning("%s", line)
        return False


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
        check_roles(curve.clients_dir, curve.engines_dir)
        dirs = {FRONTEND_DOMAIN: curve.clients_dir, BACKEND_DOMAIN: curve.engines_dir}
        self.refusals = CurveRefusals({SOCKET_OF_DOMAIN[d]: f for d, f in dirs.items()})
        self.auth = _Authenticator(ctx, self.refusals)
        for domain, folder in dirs.items():
            keys = key_files(folder)
            self.refusals.know("client" if domain == FRONTEND_DOMAIN else "engine", keys)
            self.auth.allow_keys(domain, set(keys))
        self.auth.start()

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

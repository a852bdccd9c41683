"""Where `zembed stats` and the exporter get broker snapshots from.

:class:`Subscriber` reads the broker's stats PUB socket (the normal way: the broker pushes one
snapshot per interval and never waits for us). :class:`OpPoller` asks the frontend with the
``stats`` op instead, for hosts that can reach the frontend but not the loopback-bound stats
socket. Both return the same snapshot (``docs/stats.md``), or None when none came in time.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import msgpack
import zmq

from zembed.security import arm_client


class SnapshotSource(Protocol):
    """Something that yields broker snapshots."""

    where: str

    def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next snapshot, or None if none arrived within ``timeout_s``."""
        ...

    def close(self) -> None: ...


class Subscriber:
    """SUB socket on the broker's stats endpoint, keeping only the newest snapshot.

    ``CONFLATE`` makes a reader that fell behind (a slow terminal, a paused process) skip to
    the latest snapshot instead of replaying old ones. With a broker that uses CURVE, give
    this client's secret key file and the broker's public key file (docs/security.md).
    """

    def __init__(self, endpoint: str, ctx: zmq.Context[Any] | None = None, *,
                 curve_secret_key: str = "", curve_server_key: str = "") -> None:
        self.where = endpoint
        self.sock: zmq.Socket[Any] = (ctx or zmq.Context.instance()).socket(zmq.SUB)
        self.sock.setsockopt(zmq.CONFLATE, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        arm_client(self.sock, curve_secret_key, curve_server_key)
        self.sock.connect(endpoint)

    def next(self, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self.sock.poll(left_ms):
                return None
            try:
                snap = msgpack.unpackb(self.sock.recv(zmq.NOBLOCK), raw=False)
            except (zmq.Again, ValueError, msgpack.UnpackException):
                continue
            if isinstance(snap, dict):
                return snap

    def close(self) -> None:
        self.sock.close(linger=0)


class OpPoller:
    """Asks the broker's frontend for a snapshot (the ``stats`` op) once per interval."""

    def __init__(self, endpoint: str, interval_s: float = 1.0, *, curve_secret_key: str = "",
                 curve_server_key: str = "") -> None:
        from zembed.client import Client

        self.where = endpoint
        self.interval_s = interval_s
        self.client = Client(endpoint, curve_secret_key=curve_secret_key,
                             curve_server_key=curve_server_key)
        self._next = time.monotonic()

    def next(self, timeout_s: float) -> dict[str, Any] | None:
        from zembed.errors import ZembedError

        wait = self._next - time.monotonic()
        if wait > timeout_s:
            time.sleep(timeout_s)
            return None
        time.sleep(max(0.0, wait))
        self._next = max(self._next + self.interval_s, time.monotonic())
        try:
            return self.client.stats(timeout=max(timeout_s - max(wait, 0.0), 0.1))
        except ZembedError:
            return None

    def close(self) -> None:
        self.client.close()


def open_source(stats_endpoint: str, frontend: str, *, poll: bool, curve_secret_key: str = "",
                curve_server_key: str = "") -> SnapshotSource:
    """The stats socket, or the frontend's ``stats`` op when ``poll``."""
    if poll:
        return OpPoller(frontend, curve_secret_key=curve_secret_key,
                        curve_server_key=curve_server_key)
    return Subscriber(stats_endpoint, curve_secret_key=curve_secret_key,
                      curve_server_key=curve_server_key)

"""The clients' connections to brokers: one DEALER per broker, heartbeats, and knowing what
was lost when one dropped.

A request in flight when a connection drops is lost with it: the broker that held it died or
restarted (a broker keeps no state across lives), or the network cut it. Embedding is a pure
function, so both clients resubmit such requests on a connection that is up, within the
caller's timeout; a reply that still arrives for the first copy is simply the answer, and a
second one is dropped (ids are matched once).

Several brokers (``Client("tcp://a:5555,tcp://b:5555")``) follow the zguide's Freelance
pattern: the client talks to every broker itself, and no broker knows of the others
(Binary Star, a primary/backup broker pair, would idle half the brokers and still need the
clients to fail over). Each broker gets a :class:`Route`: a DEALER of its own with a drop
monitor. Requests are dealt round-robin over the routes that are up, and the client knows
which route carries each one, so when a route drops, exactly its requests are sent again on
another (:meth:`Routes.lost`). One DEALER connected to every broker cannot do that: it hides
which connection took a request, and a request resent the moment a drop is reported can still
be dealt to the dying connection (libzmq reports the drop before it removes the pipe), where it
is lost a second time; CI saw that.

ZeroMQ reconnects by itself and says nothing to the application; a socket monitor reports the
drop (``EVENT_DISCONNECTED``) and every new connection (``EVENT_HANDSHAKE_SUCCEEDED``): a new
one means the earlier one is gone, and what was sent on it is lost even if its drop was not
seen in time (:class:`LinkEvents`). A broker process that dies has its connections closed by
the kernel at once; ZMTP heartbeats (PING/PONG, RFC 37) turn a *silent* peer (host down, link
cut) into a closed connection within 3 heartbeat periods (the clients' ``heartbeat_ms``, 1 s by
default), so that case is noticed too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from zembed.errors import DeadlineExceeded, EngineUnavailable, Overloaded, ZembedError
from zembed.security import arm_client

#: ZMTP PING period on an otherwise idle connection (the clients' ``heartbeat_ms`` default).
HEARTBEAT_IVL_MS = 1000
#: A connection with no traffic (not even a PONG) for this many periods is closed and
#: redialled, and what it carried is resent elsewhere.
HEARTBEAT_PERIODS = 3
#: Shortest heartbeat period a client accepts, ms.
MIN_HEARTBEAT_MS = 10

#: Makes a plain (not asyncio) socket of a type in the client's context.
SocketFactory = Callable[[int], "zmq.Socket[Any]"]


def endpoints(spec: str | Sequence[str]) -> list[str]:
    """Broker endpoints from one string (comma-separated) or a sequence of them, in order,
    without repeats; ValueError when there is none."""
    parts = spec.split(",") if isinstance(spec, str) else [e for s in spec for e in s.split(",")]
    out = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not out:
        raise ValueError(f"no broker endpoint in {spec!r}")
    return out


def configure(sock: zmq.Socket[Any], curve_secret_key: str, curve_server_key: str,
              heartbeat_ms: int = HEARTBEAT_IVL_MS) -> None:
    """Options every client DEALER gets before it connects."""
    sock.setsockopt(zmq.LINGER, 0)
    # Do not park requests on a connection that is not up: a send fails at once (EAGAIN) and
    # the client tries another broker, or waits for one, bounded by the request's timeout.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms * HEARTBEAT_PERIODS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, heartbeat_ms * HEARTBEAT_PERIODS)
    arm_client(sock, curve_secret_key, curve_server_key)


_monitors = itertools.count(1)


def open_monitor(sock: zmq.Socket[Any], make: SocketFactory) -> zmq.Socket[Any]:
    """A PAIR socket that receives ``sock``'s connection events (call before connecting).

    The inproc address is unique per process and call. pyzmq's ``get_monitor_socket`` names it
    after the socket's file descriptor, which the OS reuses: a client created right after
    another was closed could find that address still bound (EADDRINUSE, seen in CI).
    """
    addr = f"inproc://zembed-monitor-{os.getpid()}-{next(_monitors)}"
    sock.monitor(addr, zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    pair = make(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    pair.connect(addr)
    return pair


def timed_out(endpoint: str, *, reachable: bool) -> ZembedError:
    """The error of a call whose timeout passed, the same for both clients.

    ``reachable``: a connection is up and the request was not lost with an earlier one, so a
    broker had it (DeadlineExceeded); otherwise no broker could be reached (EngineUnavailable).
    """
    if reachable:
        return DeadlineExceeded(f"no answer from {endpoint} within the request's timeout")
    return EngineUnavailable(f"connection to {endpoint} lost with the request in flight and "
                             "not back within its timeout")


class LinkEvents:
    """Reads one route's monitor messages: was what it carried lost, and is it up now.

    The first connection is not a loss (nothing was sent on it before). Every later one is: a
    broker restarted under a CI load once came back without the client having acted on the
    drop, and its request waited for an answer that could not come until the timeout.
    """

    def __init__(self) -> None:
        self.connections = 0
        #: A drop was reported and no handshake since: not to be sent on.
        self.down = False

    def lost(self, message: list[bytes]) -> bool:
        try:
            event = parse_monitor_message(message)["event"]
        except Exception:  # a malformed monitor frame says nothing
            return False
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connections += 1
            self.down = False
            return self.connections > 1
        if event == zmq.EVENT_DISCONNECTED:
            self.down = True
            return True
        return False


class Route:
    """One broker: its DEALER, the DEALER's monitor and what the monitor said."""

    def __init__(self, endpoint: str, make: SocketFactory, curve_secret_key: str,
                 curve_server_key: str, heartbeat_ms: int = HEARTBEAT_IVL_MS) -> None:
        self.endpoint = endpoint
        self.sock = make(zmq.DEALER)
        try:
            configure(self.sock, curve_secret_key, curve_server_key, heartbeat_ms)
            self.monitor = open_monitor(self.sock, make)
        except BaseException:
            self.sock.close(linger=0)
            raise
        self.events = LinkEvents()

    def connect(self) -> None:
        self.sock.connect(self.endpoint)

    def events_now(self) -> int:
        """The DEALER's ``EVENTS`` (POLLIN: replies wait; POLLOUT: a connection is up)."""
        return cast(int, self.sock.getsockopt(zmq.EVENTS))

    def up(self) -> bool:
        """A send now would reach the broker: connected (IMMEDIATE: POLLOUT), and no drop was
        reported since the last handshake (libzmq reports a drop before it removes the pipe,
        so POLLOUT alone can still point at a dying connection)."""
        return not self.events.down and bool(self.events_now() & zmq.POLLOUT)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class Routes:
    """Every broker of a client, which route carries each request, and what a drop lost.

    Used by both clients, from one thread (or one event loop) only.
    """

    def __init__(self, spec: str | Sequence[str], make: SocketFactory,
                 curve_secret_key: str = "", curve_server_key: str = "",
                 heartbeat_ms: int = HEARTBEAT_IVL_MS) -> None:
        if not isinstance(heartbeat_ms, int) or heartbeat_ms < MIN_HEARTBEAT_MS:
            raise ValueError(f"heartbeat_ms must be an integer of at least {MIN_HEARTBEAT_MS}, "
                             f"got {heartbeat_ms!r}")
        self.endpoints = endpoints(spec)
        self.all: list[Route] = []
        try:
            for endpoint in self.endpoints:
                self.all.append(Route(endpoint, make, curve_secret_key, curve_server_key,
                                      heartbeat_ms))
            for route in self.all:
                route.connect()
        except BaseException:  # bad keys, bad endpoint: leave no socket behind
            self.close()
            raise
        self.carried: dict[int, Route] = {}  # request id -> the route it was last sent on
        self._next = 0

    def choose(self, avoid: Collection[str] = (), prefer: str | None = None) -> list[Route]:
        """The routes to try a send on, in order: ``prefer`` first, then round-robin from the
        next one; routes in ``avoid`` (brokers that just refused this request) last."""
        n = len(self.all)
        if n == 1:
            return self.all
        start = self._next
        self._next = (start + 1) % n
        order = [self.all[(start + i) % n] for i in range(n)]
        if prefer is not None or avoid:
            order.sort(key=lambda r: (r.endpoint != prefer, r.endpoint in avoid))
        return order

    def send(self, rid: int, frames: list[bytes], avoid: Collection[str] = (),
             prefer: str | None = None) -> Route | None:
        """Send on the first route that is up and takes it (never blocks); None: none did."""
        for route in self.choose(avoid, prefer):
            if route.events.down:
                continue
            try:
                route.sock.send_multipart(frames, zmq.DONTWAIT)
            except zmq.Again:  # not connected, or its queue is full: the next one
                continue
            self.carried[rid] = route
            return route
        return None

    def done(self, rid: int) -> Route | None:
        """``rid`` was answered or given up: a drop of its route no longer concerns it.
        Returns the route that carried it last (None if it was lost and not yet resent)."""
        return self.carried.pop(rid, None)

    def lost(self) -> list[int]:
        """Read every monitor; the ids carried by routes whose connection was lost."""
        gone: list[Route] = []
        for route in self.all:
            dropped = False
            while True:
                try:
                    dropped |= route.events.lost(route.monitor.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            if dropped:
                gone.append(route)
        if not gone:
            return []
        out = [rid for rid, route in self.carried.items() if route in gone]
        for rid in out:
            del self.carried[rid]
        return out

    def count_up(self) -> int:
        """Routes up now (at least 1: sizing for none is sizing for the next one up)."""
        return max(1, sum(1 for route in self.all if route.up()))

    def any_up(self, avoid: Collection[str] = ()) -> bool:
        """A route outside ``avoid`` is up now."""
        return any(route.up() for route in self.all if route.endpoint not in avoid)

    def recv(self) -> list[list[bytes]]:
        """Every reply waiting on any route (never blocks)."""
        out = []
        for route in self.all:
            while True:
                try:
                    out.append(route.sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        return out

    def close(self) -> None:
        for route in self.all:
            route.close()
        self.all = []


class Refusals:
    """A call's 429s across brokers: try another broker that is up at once, and back off only
    when every one refused in this round (the issue's "retried on another that has room").

    A 429 ticket belongs to the broker that gave it; after backing off, the call goes back to
    that broker first (``prefer``), where the ticket keeps its place. Another broker takes an
    unknown ticket as a new request, so carrying it there costs nothing.
    """

    def __init__(self) -> None:
        self.avoid: set[str] = set()
        self.prefer: str | None = None
        #: The broker the last attempt went to (set by the client).
        self.last: str | None = None

    def elsewhere(self, exc: ZembedError, routes: Routes) -> bool:
        """The last attempt failed with ``exc``: True to try another broker now."""
        if not isinstance(exc, Overloaded) or self.last is None or len(routes.all) == 1:
            return False
        self.avoid.add(self.last)
        if routes.any_up(self.avoid):
            return True
        self.avoid.clear()
        self.prefer = self.last
        return False

"""The clients' connection to the broker: heartbeats, and knowing when it was lost.

A request in flight when the connection drops is lost with it: the broker that held it died or
restarted (a broker keeps no state across lives), or the network cut it. Embedding is a pure
function, so both clients resubmit such requests once a connection is back, within the
caller's timeout; a reply that still arrives for the first copy is simply the answer, and a
second one is dropped (ids are matched once).

ZeroMQ reconnects by itself and says nothing to the application; a socket monitor reports the
drop (``EVENT_DISCONNECTED``) and every new connection (``EVENT_HANDSHAKE_SUCCEEDED``). A client
has one connection per broker endpoint: a new one to an endpoint means the earlier one to it is
gone, and what was sent on it is lost even if its drop was not seen in time (:class:`LinkEvents`).

Several brokers (``Client("tcp://a:5555,tcp://b:5555")``): the one DEALER connects to each,
and ZeroMQ deals requests round-robin over the connections that are up (``ZMQ_IMMEDIATE``: never
to one that is not), which spreads the load and skips a broker that is down; a retried 429 goes
to the next broker. This is the zguide's Freelance pattern in its simplest form (model one:
the client talks to every server, and a lost request is sent again); a drop of any connection
resubmits everything in flight, since a DEALER cannot tell which connection carried a request,
and the answer that comes first wins. A broker
process that dies has its connections closed by the kernel at once; ZMTP heartbeats
(PING/PONG, RFC 37) turn a *silent* peer (host down, link cut) into a closed connection within
``HEARTBEAT_TIMEOUT_MS``, so that case is noticed too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from zembed.errors import DeadlineExceeded, EngineUnavailable, ZembedError
from zembed.security import arm_client

#: ZMTP PING period on an otherwise idle connection.
HEARTBEAT_IVL_MS = 1000
#: A connection with no traffic (not even a PONG) for this long is closed and redialled.
HEARTBEAT_TIMEOUT_MS = 3000


def endpoints(spec: str | Sequence[str]) -> list[str]:
    """Broker endpoints from one string (comma-separated) or a sequence of them, in order,
    without repeats; ValueError when there is none."""
    parts = spec.split(",") if isinstance(spec, str) else [e for s in spec for e in s.split(",")]
    out = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not out:
        raise ValueError(f"no broker endpoint in {spec!r}")
    return out


def dial(sock: S, endpoint: str | Sequence[str], curve_secret_key: str,
         curve_server_key: str) -> S:
    """Configure and connect a client DEALER to every broker endpoint; returns its drop
    monitor (see open_monitor).

    On any failure (bad keys, bad endpoint) the socket is closed before the error goes up, so
    a client that could not be built leaves no socket behind.
    """
    try:
        configure(sock, curve_secret_key, curve_server_key)
        monitor = open_monitor(sock)
        for one in endpoints(endpoint):
            sock.connect(one)
    except BaseException:
        sock.close(linger=0)
        raise
    return monitor


def configure(sock: zmq.Socket[Any], curve_secret_key: str, curve_server_key: str) -> None:
    """Options every client DEALER gets before it connects."""
    sock.setsockopt(zmq.LINGER, 0)
    # Do not park requests on a connection that is not up: a send waits for one (bounded by
    # the request's timeout) instead, so the client knows whether a broker ever had it.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    arm_client(sock, curve_secret_key, curve_server_key)


_monitors = itertools.count(1)
#: A sync or an asyncio socket: the monitor is of the same flavour (same context class).
S = TypeVar("S", bound="zmq.Socket[Any]")


def open_monitor(sock: S) -> S:
    """A PAIR socket that receives ``sock``'s connection drops (call before connecting).

    The inproc address is unique per process and call. pyzmq's ``get_monitor_socket`` names it
    after the socket's file descriptor, which the OS reuses: a client created right after
    another was closed could find that address still bound (EADDRINUSE, seen in CI).
    """
    addr = f"inproc://zembed-monitor-{os.getpid()}-{next(_monitors)}"
    sock.monitor(addr, zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    pair = cast(S, sock.context.socket(zmq.PAIR))
    pair.setsockopt(zmq.LINGER, 0)
    pair.connect(addr)
    return pair


def close(sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
    """Stop monitoring, then close both sockets at once (linger 0)."""
    with contextlib.suppress(zmq.ZMQError):
        sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=0)


def connected(sock: zmq.Socket[Any]) -> bool:
    """True while a connection to the broker is up (with IMMEDIATE, POLLOUT means one is).

    At a timeout this tells "no broker reachable" from "a broker had it and did not answer".
    The lost-request table alone cannot: with a broker gone for good, a reconnect on its old
    port was seen to come up for a moment and take the resubmitted request, then drop again.
    """
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLOUT)


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
    """Reads monitor messages as "what is in flight was lost": a drop, or a new connection.

    The first connection to each endpoint is not a loss (nothing was sent on it before).
    Every later one is: a broker restarted under a CI load once came back without the client
    having acted on the drop, and its request waited for an answer that could not come until
    the timeout.
    """

    def __init__(self) -> None:
        self.connections = 0
        self._seen: set[Any] = set()  # endpoints that had a connection

    def lost(self, message: list[bytes]) -> bool:
        try:
            parsed = parse_monitor_message(message)
            event = parsed["event"]
        except Exception:  # a malformed monitor frame says nothing
            return False
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connections += 1
            endpoint = parsed.get("endpoint")
            again = endpoint in self._seen
            self._seen.add(endpoint)
            return again
        return bool(event == zmq.EVENT_DISCONNECTED)

"""The broker's stats: the snapshot, its PUB socket, connected clients, the loop watchdog.

Once per ``stats_interval_s`` the loop builds one snapshot (``docs/stats.md`` documents every
field) and sends it as a single msgpack frame on a PUB socket. PUB drops messages for a
subscriber whose queue is full (``SNDHWM`` of a few snapshots) and the send is non-blocking,
so a subscriber that is slow, stalled or gone costs the broker nothing. The same snapshot
answers the ``stats`` management op, and its readiness part answers ``ready``.

Binding the stats endpoint can fail (the port is taken by another broker on the host): the
broker then serves without it and says so in the log and in the snapshot, because metrics
must never take the service down.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zembed import __version__
from zembed.broker.flow import EmbedFlow
from zembed.broker.metrics import LoopMeter
from zembed.broker.state import BrokerState, announced_brokers
from zembed.messages import packb
from zembed.security import CurveRefusals

log = logging.getLogger("zembed.broker")

#: Version of the snapshot layout; bumped when a field changes meaning or goes away.
SCHEMA = 1
#: Snapshots queued per subscriber before newer ones are dropped for it.
PUB_HWM = 4
#: Kernel send buffer per subscriber connection, bytes. Fixed rather than autotuned (up to
#: several MB), so a stalled subscriber holds little memory and is dropped for soon; dozens
#: of snapshots still fit, plenty for a subscriber that reads.
PUB_SNDBUF = 64 << 10


class StatsPublisher:
    """The PUB socket: binds if it can, sends without ever blocking.

    :param endpoint: where to bind; empty = no stats socket.
    """

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.sock: zmq.Socket[Any] | None = None
        self.error: str | None = None
        self.published = 0
        self.dropped = 0

    def bind(self, arm: Callable[[zmq.Socket[Any]], None] | None = None) -> None:
        """Bind the PUB socket; ``arm`` secures it first (CURVE) when the broker is secured."""
        if not self.endpoint:
            return
        sock = self.ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, PUB_HWM)
        sock.setsockopt(zmq.SNDBUF, PUB_SNDBUF)
        sock.setsockopt(zmq.LINGER, 0)
        if arm is not None:
            arm(sock)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self.error = f"cannot bind {self.endpoint}: {exc}"
            log.error("stats socket off: %s (set --stats-endpoint to another address, or '' "
                      "to disable it)", self.error)
            return
        self.sock = sock

    def publish(self, snapshot: dict[str, Any]) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(packb(snapshot), zmq.NOBLOCK)
        except zmq.Again:  # PUB drops on its own; this only guards the call itself
            self.dropped += 1
        else:
            self.published += 1

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"endpoint": self.endpoint, "bound": self.sock is not None,
                               "published": self.published}
        if self.error:
            out["error"] = self.error
        return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


#: Monitor events that end a handshake without a session (key refused, wrong mechanism, bytes
#: that are not ZMTP, a peer gone mid-handshake).
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ConnectionCounter:
    """Connections open on a socket, from its ZeroMQ monitor: those whose handshake completed.

    A TCP accept is not a client: with CURVE on, a peer whose key is refused is accepted, fails
    its handshake and is dropped (and its libzmq may try again). So ``accepted`` counts
    completed handshakes and ``failed`` the others, and ``open`` is completed handshakes not yet
    disconnected. libzmq ends every connection it accepted with exactly one handshake event,
    succeeded or failed, before its one disconnect, so open = succeeded + failed - disconnected
    counts only sessions, without tracking connections one by one (the handshake events do not
    say which connection they are about).

    The monitor's PAIR socket must be drained by the loop (:meth:`drain`), which polls it
    with the others.
    """

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.watched = sock
        self.sock = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED
                                            | zmq.EVENT_DISCONNECTED)
        self.accepted = 0
        self.failed = 0
        self.disconnected = 0

    @property
    def open(self) -> int:
        """Sessions open now: completed handshakes whose connection has not closed."""
        return max(0, self.accepted + self.failed - self.disconnected)

    def drain(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.count(event["event"])

    def count(self, event: int) -> None:
        """Account for one monitor event."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.accepted += 1
        elif event & HANDSHAKE_FAILED:
            self.failed += 1
        elif event == zmq.EVENT_DISCONNECTED:
            self.disconnected += 1

    def close(self) -> None:
        self.watched.disable_monitor()
        self.sock.close(linger=0)


class LoopWatchdog:
    """A thread that logs the loop's stack when one turn runs past ``stall_s``.

    The loop itself cannot report that it is stuck, and a probe only learns it by a timeout;
    the log line says *where* it is stuck. Counted in ``broker.loop.stalls``.
    """

    def __init__(self, meter: LoopMeter, stall_s: float) -> None:
        self.meter = meter
        self.stall_s = stall_s
        self.stalls = 0
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="zembed-watchdog", daemon=True)

    def start(self) -> None:
        """Watch the calling thread (the loop's)."""
        self._loop_thread = threading.get_ident()
        if self.stall_s > 0:
            self._thread.start()

    def _watch(self) -> None:
        reported: float | None = None
        while not self._stop.wait(min(1.0, self.stall_s / 4)):
            since = self.meter.busy_since
            if since is None or since == reported:
                continue
            stuck_s = time.monotonic() - since
            if stuck_s >= self.stall_s:
                reported = since
                self.stalls += 1
                frame = sys._current_frames().get(self._loop_thread)
                where = "".join(traceback.format_stack(frame)) if frame else "(unknown)\n"
                log.error("broker loop stuck in one turn for %.1f s (probes go unanswered); "
                          "it is at:\n%s", stuck_s, where.rstrip())

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)


class BrokerStats:
    """Builds snapshots from the broker's parts and publishes one per interval.

    :param interval_s: seconds between snapshots (also the loop-utilisation interval).
    """

    def __init__(self, state: BrokerState, flow: EmbedFlow, counters: dict[str, int],
                 publisher: StatsPublisher, clients: ConnectionCounter, *,
                 interval_s: float, stall_s: float, now: float,
                 curve: CurveRefusals | None = None) -> None:
        self.state = state
        self.flow = flow
        self.cache = flow.cache
        self.counters = counters
        self.publisher = publisher
        self.clients = clients
        #: Refused CURVE handshakes (the broker's authenticator counts them); None without CURVE.
        self.curve = curve
        self.interval_s = interval_s
        self.loop = LoopMeter(now)
        self.watchdog = LoopWatchdog(self.loop, stall_s)
        self.started = now
        self.started_at = time.time()
        self.seq = 0
        self.next_due = now + interval_s

    def tick(self, now: float) -> None:
        """Close an interval and publish, when one is due."""
        if now < self.next_due:
            return
        self.next_due = max(self.next_due + self.interval_s, now)
        self.loop.roll(now)
        if self.publisher.sock is not None:
            self.seq += 1
            self.publisher.publish(self.snapshot(now))

    def readiness(self, now: float) -> tuple[list[str], list[str]]:
        """What keeps the broker from being ready: (names, reasons); both empty when ready."""
        missing, reasons = [], []
        for lane in self.state.missing_lanes(now):
            missing.append(lane)
            peers = self.state.by_lane[lane]
            if not peers:
                reasons.append(f"lane {lane}: no engine registered (engines register after "
                               "warm-up)")
            else:
                age = min(self.state.heard_age(e, now) for e in peers)
                reasons.append(f"lane {lane}: no engine answered its last heartbeat "
                               f"(last heard {age:.1f} s ago)")
        cache = self.cache.state()
        if not cache.get("up", True):
            missing.append("cache")
            reasons.append(f"cache: {cache.get('backend')} unreachable "
                           f"({cache.get('errors', 0)} errors; set cache off to run without)")
        return missing, reasons

    def topology(self, now: float) -> dict[str, Any]:
        """Who serves this broker (the ``ready`` op, ``zembed ready``): per lane, each engine's
        host, pid, credits here, the brokers it splits them over and how many it serves now;
        and the cache's state (for a cluster, its nodes)."""
        lanes = {lane: [{"id": e.identity.hex(), "host": e.info.get("host"),
                         "pid": e.info.get("pid"), "alive": self.state.is_live(e, now),
                         "credits": e.credits_total,
                         "engine_credits": e.info.get("engine_credits", e.credits_total),
                         "brokers": announced_brokers(e.info),
                         "serving": e.info.get("serving", 1)}
                        for e in self.state.by_lane[lane]]
                 for lane in self.state.lanes}
        return {"lanes": lanes, "cache": self.cache.state()}

    def snapshot(self, now: float) -> dict[str, Any]:
        """The whole snapshot (docs/stats.md): lanes, engines, cache, broker."""
        snap = self.state.snapshot(now)
        missing, _ = self.readiness(now)
        uptime = round(now - self.started, 3)
        snap.update(
            schema=SCHEMA, seq=self.seq, time=round(time.time(), 3),
            interval_s=self.interval_s, version=__version__, uptime_s=uptime,
            counters=dict(self.counters),
            cache={**self.cache.state(), "corrupt": self.flow.cache_corrupt},
            broker={
                "version": __version__, "pid": os.getpid(), "uptime_s": uptime,
                "started_at": round(self.started_at, 3), "ready": not missing,
                "missing": missing, "connected_clients": self.clients.open,
                "clients_accepted": self.clients.accepted,
                "handshakes_failed": self.clients.failed,
                "curve_refused": self.curve_refused(),
                "replies": self.flow.replier.snapshot(),
                "loop": {**self.loop.snapshot(), "stalls": self.watchdog.stalls},
                "stats_socket": self.publisher.state(),
            })
        return snap

    def curve_refused(self) -> dict[str, int]:
        """Handshakes refused for their key, per socket (zeros with CURVE off)."""
        counts = {"frontend": 0, "backend": 0}
        if self.curve is not None:
            counts.update(self.curve.counts)
        return counts

    def close(self) -> None:
        self.watchdog.stop()
        self.clients.close()
        self.publisher.close()

"""Engine runtime: the DEALER socket, heartbeats, reconnects, and the inference thread.

Two threads, one concern each. The socket thread owns the DEALER: it registers (READY), turns
REQUESTs into jobs, heartbeats while the inference thread makes progress, forwards replies that
the inference thread hands it over an inproc pipe, and reconnects with backoff when the broker
goes silent or says DISCONNECT. The inference thread takes batches from the job queue and runs
the model, so a long forward pass never stops heartbeats -- unless it is stuck past
``stall_timeout_s``, when silence is exactly what should make the broker declare us dead.

Inference runs on the process's *main* thread and the socket loop on a helper thread: measured
here, the same torch forward pass ran 15-25% slower on a secondary thread than on the main one
(benchmarks/README.md), and the socket loop costs next to nothing wherever it runs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from zembed import __version__
from zembed import protocol as p
from zembed.client.link import endpoints
from zembed.engines.batching import Job, JobQueue
from zembed.engines.compute import BatchRunner, Outcome
from zembed.engines.model import EmbeddingModel
from zembed.messages import packb, unpack_header
from zembed.security import arm_client

log = logging.getLogger("zembed.engine")

_GEN = struct.Struct("<Q")
#: Bulk batches run in half-size passes, with queries let in between, while an interactive
#: job arrived within this many seconds (otherwise at full size: nothing to make room for).
QUERIES_RECENT_S = 1.0


@dataclass(frozen=True)
class RuntimeSettings:
    """The runtime's share of an engine config (the model has its own)."""

    broker: str
    credits: int
    max_batch: int
    max_tokens: int = 0  # padded tokens per forward pass (text); 0 = no limit
    max_wait_ms: float = 0.0
    heartbeat_interval_ms: int = p.HEARTBEAT_INTERVAL_MS
    heartbeat_liveness: int = p.HEARTBEAT_LIVENESS
    stall_timeout_s: float = 60.0
    curve_secret_key: str = ""  # CurveZMQ: this engine's .key_secret file
    curve_server_key: str = ""  # CurveZMQ: the broker's public .key file
    #: Tests only: a file of milliseconds to sleep before each batch (a slowed engine).
    batch_delay_file: str = ""


class EngineRuntime:
    """Serve one model to a broker until stopped.

    :param model: a loaded, warmed-up model.
    :param settings: endpoint, credits, batching and heartbeat settings.
    :param ready_extra: more READY fields (warm-up figures, for instance).
    """

    def __init__(self, model: EmbeddingModel, settings: RuntimeSettings,
                 ready_extra: dict[str, Any] | None = None,
                 ctx: zmq.Context[Any] | None = None) -> None:
        self.model = model
        self.s = settings
        self.ready_extra = ready_extra or {}
        self.ctx = ctx or zmq.Context()
        self.jobs = JobQueue()
        self.runner = BatchRunner(model, settings.max_batch, settings.max_tokens)
        # Decoding starts as a job arrives, so it overlaps the forward pass of the batch before.
        self.pool = (ThreadPoolExecutor(model.prepare_workers, thread_name_prefix="zembed-prep")
                     if model.prepare_workers > 0 else None)
        self.generation = 0
        self.busy_since: float | None = None
        self._stop = threading.Event()
        self._pipe_addr = f"inproc://zembed-engine-{id(self)}"
        #: The brokers served (set by the socket thread; read by tests and diagnostics).
        self.links: list[Link] = []
        self._stuck_logged = False

    # -- socket thread ---------------------------------------------------------------------

    def run(self) -> None:
        """Connect, register and serve; returns after :meth:`stop`.

        Call it from the main thread: inference runs here, the socket loop on a helper thread.
        """
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.bind(self._pipe_addr)
        io = threading.Thread(target=self._io_loop, args=(pipe,), name="zembed-io", daemon=True)
        io.start()
        try:
            self._infer_loop()
        finally:
            self._stop.set()
            io.join(timeout=5)
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)

    def _io_loop(self, pipe: zmq.Socket[Any]) -> None:
        """The socket thread: broker traffic, heartbeats, reconnects, reply forwarding, for
        every broker this engine serves (a :class:`Link` each)."""
        interval = self.s.heartbeat_interval_ms / 1000
        links = [Link(endpoint) for endpoint in endpoints(self.s.broker)]
        self.links = links
        now = time.monotonic()
        for link in links:
            self._connect(link, links, now)
        while not self._stop.is_set():
            poller = zmq.Poller()
            poller.register(pipe, zmq.POLLIN)
            for link in links:
                if link.sock is not None:
                    poller.register(link.sock, zmq.POLLIN)
            events = dict(poller.poll(max(1, int(interval * 1000 / 2))))
            now = time.monotonic()
            changed = False
            for link in links:
                if link.sock is not None and link.sock in events:
                    changed |= self._heard(link, now, interval)
            if pipe in events:
                self._forward_replies(pipe, links, now)
            changed |= self._tend(links, now, interval)
            if changed:
                self._share_credits(links)
        for link in links:
            if link.sock is not None:
                self._send(link, [p.DISCONNECT])
                link.sock.close(linger=100)
        pipe.close(linger=0)

    def _tend(self, links: list[Link], now: float, interval: float) -> bool:
        """Timers of every link: lose the silent, redial after their backoff, heartbeat the
        idle. True when a link was lost (its credits are to be shared again)."""
        healthy = self.healthy(now)
        lost = False
        for link in links:
            if link.sock is not None and now >= link.expires:
                self._lose(link, now)
                lost = True
            elif link.sock is None and now >= link.retry_at:
                if healthy:
                    self._connect(link, links, now)
                    self._stuck_logged = False
                elif not self._stuck_logged:
                    # While a forward pass is stuck, stay unregistered: READY now would only
                    # take work this engine cannot do (its broker would lose it again).
                    log.warning("inference is stuck; re-registering once it moves again")
                    self._stuck_logged = True
            elif link.sock is not None and now - link.last_sent >= interval and healthy:
                self._send(link, [p.HEARTBEAT])
        return lost

    def _heard(self, link: Link, now: float, interval: float) -> bool:
        """Read what one broker sent; True when the link just started serving (its credits
        are to be shared again)."""
        assert link.sock is not None
        alive, registered = self._drain_broker(link, now)
        if not registered:
            link.expires = now  # told to (re-)register: reconnect in the loop
            return False
        if not alive:
            return False
        link.expires = now + interval * self.s.heartbeat_liveness
        link.backoff = p.RECONNECT_MIN_MS / 1000
        if link.serving:
            return False
        link.serving, link.first = True, False
        return True

    def _lose(self, link: Link, now: float) -> None:
        """A broker went silent or asked us to re-register: close, drop its queued work
        (its broker answered it 503, or is gone), and redial after a backoff."""
        assert link.sock is not None
        link.sock.close(linger=0)
        link.sock = None
        link.serving = link.first = False
        dropped = self.jobs.drop_generation(link.generation)
        log.warning("broker %s silent or asked us to re-register; reconnecting in %.2fs%s",
                    link.endpoint, link.backoff,
                    f" (dropped {dropped} queued job(s) of it)" if dropped else "")
        link.retry_at = now + link.backoff
        link.backoff = min(link.backoff * 2, p.RECONNECT_MAX_MS / 1000)

    def stop(self) -> None:
        """Ask the engine to say DISCONNECT and exit (signal handlers call this)."""
        self._stop.set()

    def healthy(self, now: float) -> bool:
        """False while one forward pass has run longer than ``stall_timeout_s``."""
        busy = self.busy_since
        return busy is None or now - busy < self.s.stall_timeout_s

    def _connect(self, link: Link, links: list[Link], now: float) -> None:
        """New DEALER (so a new identity at the broker), then READY with this broker's share
        of the credits."""
        self.generation += 1
        link.generation = self.generation
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        arm_client(sock, self.s.curve_secret_key, self.s.curve_server_key)
        sock.connect(link.endpoint)
        link.sock = sock
        serving = sum(1 for other in links if other.serving and other is not link)
        # At start no broker serves yet: assume all will. Later, a broker that comes back
        # asks for its share beside those serving; they give theirs up once it answers.
        link.told = serving + 1 if serving else len(links)
        link.credits = credit_shares(self.s.credits, link.told)[0]
        link.expires = now + self.s.heartbeat_interval_ms / 1000 * self.s.heartbeat_liveness
        self._send(link, [p.READY, packb(self.ready_header(link.credits, links, link.told))])
        log.info("connecting to broker %s (lane %s, %d of %d credits)", link.endpoint,
                 self.model.lane, link.credits, self.s.credits)

    def _share_credits(self, links: list[Link]) -> None:
        """Split the credits between the brokers this engine serves now: one went (the others
        take its share) or came back (they give some up). A HEARTBEAT with a ``credits``
        header tells each broker whose share (or count of brokers served) changed.

        A broker still on its first connection attempt counts as served, so that the first
        broker to answer at start-up does not take every credit for a moment."""
        counted = [link for link in links if link.serving or (link.first and link.sock)]
        if not counted:
            return  # none to share with: the next broker to answer gets its READY share
        for link, share in zip(counted, credit_shares(self.s.credits, len(counted)),
                               strict=True):
            if link.serving and (share, len(counted)) != (link.credits, link.told):
                link.credits, link.told = share, len(counted)
                self._send(link, [p.HEARTBEAT, packb({"credits": share,
                                                      "serving": len(counted)})])
                log.info("broker %s now gets %d of %d credits (%d broker(s) served)",
                         link.endpoint, share, self.s.credits, len(counted))

    def ready_header(self, credits: int | None = None, links: list[Link] | None = None,
                     serving: int = 1) -> dict[str, Any]:
        """What READY announces: lane, kinds, model fingerprint, dim, credits (this broker's
        share), and the brokers this engine serves."""
        kinds = sorted(self.model.kinds)
        brokers = [link.endpoint for link in links] if links else [self.s.broker]
        return {
            "version": p.ENGINE_PROTO_VERSION, "zembed": __version__, "lane": self.model.lane,
            "kinds": kinds, "fingerprint": self.model.fingerprint(kinds[0]),
            "fingerprints": {k: self.model.fingerprint(k) for k in kinds},
            "dim": self.model.dim, "credits": self.s.credits if credits is None else credits,
            "max_batch": self.s.max_batch, "heartbeat_ms": self.s.heartbeat_interval_ms,
            "brokers": brokers, "engine_credits": self.s.credits,
            "serving": serving,
            "pid": os.getpid(), "host": socket.gethostname(), **self.model.describe(),
            **self.ready_extra,
        }

    def _drain_broker(self, link: Link, now: float) -> tuple[bool, bool]:
        """Handle what one broker sent: (heard from it, still registered)."""
        assert link.sock is not None
        alive, registered = False, True
        while True:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return alive, registered
            if len(frames) < 2 or frames[0] != p.ENGINE_PROTO:
                log.warning("ignoring a malformed message from the broker")
                continue
            alive = True
            cmd = frames[1]
            if cmd == p.REQUEST and len(frames) == 4:
                try:
                    self._queue_job(frames[2], frames[3], now, link.generation)
                except Exception as exc:  # the broker validates; this guards against bugs
                    log.error("dropped a malformed REQUEST from the broker: %r", exc)
            elif cmd == p.DISCONNECT:
                reason = unpack_header(frames[2]).get("reason") if len(frames) > 2 else None
                log.warning("broker %s sent DISCONNECT (%s)", link.endpoint, reason)
                registered = False

    def _queue_job(self, raw_header: bytes, body: bytes, now: float, generation: int) -> None:
        h = unpack_header(raw_header)
        items = msgpack.unpackb(body, raw=False)
        job = Job(h["tok"], h["kind"], h["normalize"], h.get("input_type"), items,
                  now + h["deadline_ms"] / 1000, generation,
                  dimensions=h.get("dimensions"), bulk=h.get("priority") == p.PRIORITY_BULK)
        if self.pool is not None:
            job.prepared = self.pool.submit(self.model.prepare, job.kind, items, job.input_type)
        self.jobs.put(job)

    def _forward_replies(self, pipe: zmq.Socket[Any], links: list[Link], now: float) -> None:
        """Replies from the inference thread, each to the connection its job came on; those
        of a connection lost since are dropped (its broker answered them already)."""
        while True:
            try:
                gen, *frames = pipe.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            generation = _GEN.unpack(gen.bytes)[0]
            for link in links:
                if link.generation == generation and link.sock is not None:
                    self._send(link, frames)
                    break

    def _send(self, link: Link, frames: list[Any]) -> None:
        assert link.sock is not None
        try:
            link.sock.send_multipart([p.ENGINE_PROTO, *frames], zmq.DONTWAIT, copy=False)
        except zmq.Again:
            log.warning("connection to broker %s is backed up; dropped a %r", link.endpoint,
                        frames[0])
        link.last_sent = time.monotonic()

    # -- inference thread ------------------------------------------------------------------

    def _infer_loop(self) -> None:
        out = self.ctx.socket(zmq.PAIR)
        out.connect(self._pipe_addr)

        def queries_first() -> None:
            """Between two passes of a bulk batch: run every query waiting, reply at once."""
            while batch := self.jobs.take_interactive(self.s.max_batch):
                for frames in self.run_batch(batch):
                    out.send_multipart(frames, copy=False)

        try:
            while not self._stop.is_set():
                batch = self.jobs.take_batch(self.s.max_batch, 0.1, self.s.max_wait_ms / 1000)
                if batch:
                    split = batch[0].bulk and self.jobs.queries_within(QUERIES_RECENT_S)
                    for frames in self.run_batch(batch, queries_first if split else None):
                        out.send_multipart(frames, copy=False)
        finally:
            out.close(linger=0)

    def run_batch(self, batch: list[Job],
                  between: Callable[[], None] | None = None) -> list[list[Any]]:
        """Embed one batch; return pipe messages ``[generation, REPLY, header, body]``.

        With ``between`` (a bulk batch while queries come in), the batch runs in passes of
        half the batch and ``between`` runs before each pass after the first: a query then
        waits for one half-size pass, not a whole bulk batch (docs/architecture.md).
        """
        now = time.monotonic()
        outer, self.busy_since = self.busy_since, now
        try:
            if self.s.batch_delay_file:
                time.sleep(batch_delay_s(self.s.batch_delay_file))
            pass_items = max(1, self.s.max_batch // 2) if between is not None else 0
            outcomes = self.runner.run(batch, now, pass_items=pass_items, between=between)
        finally:
            self.busy_since = outer  # a query run between passes hands the bulk batch back
        return [self._reply(o) for o in outcomes]

    def _reply(self, o: Outcome) -> list[Any]:
        # Cumulative batch counters ride along so the broker's stats show batch sizes.
        header: dict[str, Any] = {"tok": o.job.token, "status": o.status,
                                  "batches": self.runner.batches,
                                  "batch_items": self.runner.items}
        if o.status == p.OK:
            header.update(dtype=p.DTYPE_BF16, shape=[o.n, o.dim])
        if o.error is not None:
            header["error"] = o.error
        if o.item_errors:
            header["item_errors"] = o.item_errors
        return [_GEN.pack(o.job.generation), p.REPLY, packb(header), o.body]


@dataclass(slots=True)
class Link:
    """One broker this engine serves: its DEALER (None while waiting to redial) and what the
    engine knows of it."""

    endpoint: str
    sock: zmq.Socket[Any] | None = None
    generation: int = 0  # of the current connection: jobs and replies carry it
    credits: int = 0  # announced to this broker now
    serving: bool = False  # heard from it since the last READY: its credits are in the split
    first: bool = True  # on its first connection attempt (neither heard nor lost yet)
    told: int = 0  # brokers served, as this broker was last told
    expires: float = 0.0  # silent until then: lost
    last_sent: float = 0.0
    retry_at: float = 0.0  # while sock is None: redial then
    backoff: float = p.RECONNECT_MIN_MS / 1000


def credit_shares(credits: int, brokers: int) -> list[int]:
    """``credits`` split as evenly as whole numbers allow over ``brokers`` (at least 1 each:
    an engine with fewer credits than brokers overcommits rather than starve one)."""
    n = max(1, brokers)
    base, extra = divmod(credits, n)
    return [max(1, base + (1 if i < extra else 0)) for i in range(n)]


def batch_delay_s(path: str) -> float:
    """Tests only (``batch_delay_file``): the file's number of milliseconds, as seconds.

    Re-read before every batch, so a test can slow a running engine down and speed it up again
    by rewriting the file; a missing file or anything but a non-negative number means 0.
    """
    try:
        with open(path) as fh:
            ms = float(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0
    return ms / 1000 if ms > 0 and ms != float("inf") else 0.0


def serve(model: EmbeddingModel, settings: RuntimeSettings,
          ready_extra: dict[str, Any] | None = None) -> None:
    """Run an engine in this process until SIGINT or SIGTERM."""
    runtime = EngineRuntime(model, settings, ready_extra)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runtime.stop())
    try:
        runtime.run()
    finally:
        runtime.ctx.term()

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
        self._sock: zmq.Socket[Any] | None = None

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
        """The socket thread: broker traffic, heartbeats, reconnects, reply forwarding."""
        interval = self.s.heartbeat_interval_ms / 1000
        backoff = p.RECONNECT_MIN_MS / 1000
        sock = self._connect()
        poller = zmq.Poller()
        poller.register(pipe, zmq.POLLIN)
        poller.register(sock, zmq.POLLIN)
        broker_expires = time.monotonic() + interval * self.s.heartbeat_liveness
        last_sent = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(max(1, int(interval * 1000 / 2))))
            now = time.monotonic()
            if sock in events:
                alive, registered = self._drain_broker(sock, now)
                if alive:
                    broker_expires = now + interval * self.s.heartbeat_liveness
                if not registered:
                    broker_expires = now  # told to (re-)register: reconnect below
                elif alive:
                    backoff = p.RECONNECT_MIN_MS / 1000
            if pipe in events:
                last_sent = self._forward_replies(pipe, sock, now, last_sent)
            if now >= broker_expires:
                poller.unregister(sock)
                sock.close(linger=0)
                log.warning("broker silent or asked us to re-register; reconnecting in %.2fs",
                            backoff)
                self._stop.wait(backoff)
                self._wait_until_healthy(interval)
                backoff = min(backoff * 2, p.RECONNECT_MAX_MS / 1000)
                sock = self._connect()
                poller.register(sock, zmq.POLLIN)
                broker_expires = time.monotonic() + interval * self.s.heartbeat_liveness
                last_sent = time.monotonic()
            elif now - last_sent >= interval and self.healthy(now):
                self._send(sock, [p.HEARTBEAT])
                last_sent = now
        self._send(sock, [p.DISCONNECT])
        sock.close(linger=100)
        pipe.close(linger=0)

    def _wait_until_healthy(self, interval: float) -> None:
        """While a forward pass is stuck, stay unregistered: READY now would only take work
        this engine cannot do (the broker would lose it a second time)."""
        if not self.healthy(time.monotonic()):
            log.warning("inference is stuck; re-registering once it moves again")
        while not self._stop.is_set() and not self.healthy(time.monotonic()):
            self._stop.wait(interval)

    def stop(self) -> None:
        """Ask the engine to say DISCONNECT and exit (signal handlers call this)."""
        self._stop.set()

    def healthy(self, now: float) -> bool:
        """False while one forward pass has run longer than ``stall_timeout_s``."""
        busy = self.busy_since
        return busy is None or now - busy < self.s.stall_timeout_s

    def _connect(self) -> zmq.Socket[Any]:
        """New DEALER (so a new identity at the broker), then READY."""
        self.generation += 1
        dropped = self.jobs.drop_generation_before(self.generation)
        if dropped:
            log.warning("dropped %d queued job(s) of the previous broker connection", dropped)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        arm_client(sock, self.s.curve_secret_key, self.s.curve_server_key)
        sock.connect(self.s.broker)
        self._sock = sock
        self._send(sock, [p.READY, packb(self.ready_header())])
        log.info("connecting to broker %s (lane %s, %d credits)", self.s.broker,
                 self.model.lane, self.s.credits)
        return sock

    def ready_header(self) -> dict[str, Any]:
        """What READY announces: lane, kinds, model fingerprint, dim, credits."""
        kinds = sorted(self.model.kinds)
        return {
            "version": p.ENGINE_PROTO_VERSION, "zembed": __version__, "lane": self.model.lane,
            "kinds": kinds, "fingerprint": self.model.fingerprint(kinds[0]),
            "fingerprints": {k: self.model.fingerprint(k) for k in kinds},
            "dim": self.model.dim, "credits": self.s.credits, "max_batch": self.s.max_batch,
            "heartbeat_ms": self.s.heartbeat_interval_ms,
            "pid": os.getpid(), **self.model.describe(), **self.ready_extra,
        }

    def _drain_broker(self, sock: zmq.Socket[Any], now: float) -> tuple[bool, bool]:
        """Handle what the broker sent: (heard from it, still registered)."""
        alive, registered = False, True
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return alive, registered
            if len(frames) < 2 or frames[0] != p.ENGINE_PROTO:
                log.warning("ignoring a malformed message from the broker")
                continue
            alive = True
            cmd = frames[1]
            if cmd == p.REQUEST and len(frames) == 4:
                try:
                    self._queue_job(frames[2], frames[3], now)
                except Exception as exc:  # the broker validates; this guards against bugs
                    log.error("dropped a malformed REQUEST from the broker: %r", exc)
            elif cmd == p.DISCONNECT:
                reason = unpack_header(frames[2]).get("reason") if len(frames) > 2 else None
                log.warning("broker sent DISCONNECT (%s)", reason)
                registered = False

    def _queue_job(self, raw_header: bytes, body: bytes, now: float) -> None:
        h = unpack_header(raw_header)
        items = msgpack.unpackb(body, raw=False)
        job = Job(h["tok"], h["kind"], h["normalize"], h.get("input_type"), items,
                  now + h["deadline_ms"] / 1000, self.generation,
                  dimensions=h.get("dimensions"), bulk=h.get("priority") == p.PRIORITY_BULK)
        if self.pool is not None:
            job.prepared = self.pool.submit(self.model.prepare, job.kind, items, job.input_type)
        self.jobs.put(job)

    def _forward_replies(self, pipe: zmq.Socket[Any], sock: zmq.Socket[Any], now: float,
                         last_sent: float) -> float:
        while True:
            try:
                gen, *frames = pipe.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return last_sent
            if _GEN.unpack(gen.bytes)[0] == self.generation:
                self._send(sock, frames)
                last_sent = now

    def _send(self, sock: zmq.Socket[Any], frames: list[Any]) -> None:
        try:
            sock.send_multipart([p.ENGINE_PROTO, *frames], zmq.DONTWAIT, copy=False)
        except zmq.Again:
            log.warning("broker connection is backed up; dropped a %r", frames[0])

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

"""A client that does not read its replies cannot grow the broker; a slow one loses nothing.

Real broker, real text engine, real sockets. The non-reading client sets a receive HWM of 1 and
a small kernel buffer, so its own libzmq stops taking data off TCP: from then on every reply
the broker makes for it has to be held by the broker, which is what the bound is about.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import Stack, recv, wait_until

from zembed import protocol as p

pytestmark = pytest.mark.slow

#: 256 copies of one text: one model item, a 256 x 384 x 4 = 393 KB f32 reply.
ITEMS = msgpack.packb(["the same sentence, over and over"] * 256)
REPLY_BYTES = 256 * 384 * 4
#: What the broker may hold for one client: 16 MiB of large replies in libzmq + 16 MiB of its
#: own backlog (+ TCP buffers); plus, in this test, the 3,000 requests waiting to be read
#: (27 MB) and one loop turn's work (512 requests). The bound leaves room for allocator slack;
#: before the cap, 3,000 unread replies took the broker from 51 MB to 1.5 GB.
RSS_BOUND_MB = 150


def rss_mb(pid: int) -> float:
    """Resident MB of ``pid``; 0 once it has exited (a zombie has no VmRSS)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def embed_frames(rid: int) -> list[bytes]:
    header = {"id": rid, "lane": "text", "n": 256, "dtype": "f32", "deadline_ms": 60_000}
    return [p.CLIENT_PROTO, msgpack.packb(header), ITEMS]


def dealer(zctx: zmq.Context[Any], stack: Stack, *, rcvhwm: int) -> zmq.Socket[Any]:
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.RCVBUF, 65_536)
    sock.connect(stack.frontend)
    return sock


class RssSampler(threading.Thread):
    """The broker's peak RSS while a test runs (every 20 ms)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> float:
        self._done.set()
        self.join(5)
        return self.peak


@pytest.fixture
def stack(stack_factory: Any) -> Stack:
    """Broker and engine on the default 1 s heartbeats: serving 3,000 large replies on a loaded
    CI machine once kept the broker's loop past the test stacks' 600 ms liveness, and the
    engine was dropped (liveness is tested elsewhere)."""
    s: Stack = stack_factory()
    s.start_broker("--cache", "memory", "--heartbeat-interval-ms", "1000")
    s.start_text("--heartbeat-interval-ms", "1000")
    s.wait_engines("text", 1)
    return s


def answered(stack: Stack) -> int:
    with stack.client(timeout=5) as c:
        snap = c.stats()
    return int(sum(snap["lanes"]["text"]["requests"].values())
               + snap["counters"]["refused_not_reading"])


def test_non_reading_client_is_cut_off_and_broker_memory_stays_bounded(
    stack: Stack, zctx: zmq.Context[Any]
) -> None:
    assert stack.broker is not None
    pid = stack.broker.popen.pid
    with stack.client(timeout=30) as good:
        good.embed_texts(["the same sentence, over and over"] * 256)  # warm: a cache hit now
        base = rss_mb(pid)
        before = answered(stack)
        sampler = RssSampler(pid)
        sampler.start()
        try:
            bad = dealer(zctx, stack, rcvhwm=1)
            total = 3000
            for rid in range(1, total + 1):
                bad.send_multipart(embed_frames(rid))
            wait_until(lambda: answered(stack) >= before + total, timeout=60)
            # Everyone else is still served while the bad client is cut off.
            assert good.embed_texts(["still here"]).shape == (1, 384)
        finally:
            peak = sampler.stop()
        with stack.client(timeout=5) as c:
            counters = c.stats()["counters"]
        assert counters["clients_cut_off"] >= 1
        assert counters["replies_dropped"] > 0
        assert counters["refused_not_reading"] > 0
        assert peak - base < RSS_BOUND_MB, (base, peak)
        bad.close()
        # The client left: what the broker held for it is released.
        wait_until(lambda: c_backlog(stack) == 0, timeout=10)
        time.sleep(0.5)
        after = rss_mb(pid)
        assert after - base < RSS_BOUND_MB / 2, (base, peak, after)
        print(f"broker RSS: {base:.0f} MB before, peak {peak:.0f} MB, {after:.0f} MB after "
              f"({total} unread {REPLY_BYTES // 1000} KB replies)")


def c_backlog(stack: Stack) -> int:
    """Bytes the broker holds for clients right now: its backlog and large replies in libzmq."""
    with stack.client(timeout=5) as c:
        replies = c.stats()["broker"]["replies"]
    return int(replies["backlog_bytes"] + replies["queued_large_bytes"])


def test_slow_reader_gets_every_reply_through_the_backlog(
    stack: Stack, zctx: zmq.Context[Any]
) -> None:
    """70 large replies (27 MB): 16 MiB may sit in libzmq, the rest wait in the backlog."""
    sock = dealer(zctx, stack, rcvhwm=4)
    total = 70
    for rid in range(1, total + 1):
        sock.send_multipart(embed_frames(rid))
    wait_until(lambda: c_backlog(stack) > 0, timeout=30)  # the backlog is in use
    time.sleep(0.5)  # not reading for a while
    got = set()
    for _ in range(total):
        frames = recv(sock, timeout=10)
        header = msgpack.unpackb(frames[1])
        assert header["status"] == 200, header
        assert len(frames[2]) == REPLY_BYTES
        got.add(header["id"])
    assert got == set(range(1, total + 1))
    with stack.client(timeout=5) as c:
        counters = c.stats()["counters"]
    assert counters["replies_deferred"] > 0
    assert counters["clients_cut_off"] == 0 and counters["replies_dropped"] == 0
    sock.close()


def test_cut_off_client_is_served_again_once_it_reads(
    stack: Stack, zctx: zmq.Context[Any]
) -> None:
    sock = dealer(zctx, stack, rcvhwm=1)
    for rid in range(1, 301):
        sock.send_multipart(embed_frames(rid))
    wait_until(lambda: answered(stack) >= 300, timeout=60)
    # Read everything that reached us; the broker dropped the rest and refused later ones.
    statuses: dict[int, int] = {}
    while sock.poll(1000):
        header = msgpack.unpackb(sock.recv_multipart()[1])
        statuses[header["status"]] = statuses.get(header["status"], 0) + 1
    assert statuses.get(200, 0) < 300
    # Reading again: a new request is answered (a refusal first, or its vectors).
    sock.send_multipart([p.CLIENT_PROTO, msgpack.packb({"op": "ping", "id": 9999}), b""])
    sock.send_multipart(embed_frames(10_000))
    seen = {}
    for _ in range(2):
        header = msgpack.unpackb(recv(sock)[1])
        seen[header["id"]] = header
    assert seen[9999]["status"] == 200
    assert seen[10_000]["status"] in (200, 429)
    if seen[10_000]["status"] == 429:
        assert "not reading" in seen[10_000]["error"] and seen[10_000]["retry_after_ms"] > 0
        sock.send_multipart(embed_frames(10_001))
        assert msgpack.unpackb(recv(sock)[1])["status"] == 200
    sock.close()

"""The embed path (cache -> plan -> admit -> dispatch -> reply) and the reply backlog, driven
by a fake clock and fake sockets: every decision checked without processes or timing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from zembed import protocol as p
from zembed.broker.flow import EmbedFlow
from zembed.broker.pending import ClientRequest
from zembed.broker.replies import TRACK_MIN_BYTES, UNTIMED_HOLD_S, Replier
from zembed.broker.state import BrokerState
from zembed.cache.backends import MemoryCache
from zembed.cache.bf16 import to_bf16

DIM = 4
ENGINE = b"engine-1"
CLIENT = b"client-1"


@dataclass
class Clock:
    t: float = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeTracker:
    done: bool = False


@dataclass
class FakeSocket:
    """A ROUTER stand-in: records what it sent; a peer may be full (EAGAIN) or gone.

    Tracked sends (large replies) get a tracker the test marks ``done`` when "written out".
    """

    sent: list[list[Any]] = field(default_factory=list)
    full: set[bytes] = field(default_factory=set)
    gone: set[bytes] = field(default_factory=set)
    trackers: list[FakeTracker] = field(default_factory=list)

    def send_multipart(self, msg_parts: Any, flags: int = 0, copy: bool = True,
                       track: bool = False, **kwargs: Any) -> FakeTracker | None:
        identity = bytes(msg_parts[0])
        if identity in self.gone:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        if identity in self.full:
            raise zmq.Again()
        self.sent.append([bytes(f) if not isinstance(f, bytes) else f for f in msg_parts])
        if not track:
            return None
        self.trackers.append(FakeTracker())
        return self.trackers[-1]

    def to(self, identity: bytes) -> list[list[Any]]:
        return [m for m in self.sent if m[0] == identity]


def headers(sock: FakeSocket, identity: bytes, at: int) -> list[dict[str, Any]]:
    """Unpacked headers of what went to ``identity`` (the header is frame ``at``)."""
    return [msgpack.unpackb(m[at]) for m in sock.to(identity)]


class Broker:
    """EmbedFlow + Replier + BrokerState wired as the broker wires them, with fakes."""

    def __init__(self, credits: int = 8, backlog_bytes: int = 1 << 20) -> None:
        self.clock = Clock()
        self.front, self.back = FakeSocket(), FakeSocket()
        self.state = BrokerState(("text",))
        self.counters: dict[str, int] = {"client_gone": 0}
        self.cache = MemoryCache(max_items=1000, ttl_s=3600)
        self.replier = Replier(self.front, self.state, self.counters, clock=self.clock,
                               max_backlog_bytes=backlog_bytes)
        self.flow = EmbedFlow(self.state, self.cache, self.replier, self.back, "t",
                              clock=self.clock)
        self.state.register(ENGINE, {"lane": "text", "kinds": ["text"], "fingerprint": "fp",
                                     "dim": DIM, "credits": credits}, self.clock())
        self._rid = 0

    def request(self, items: list[str], deadline_s: float = 10.0,
                client: bytes = CLIENT) -> ClientRequest:
        self._rid += 1
        now = self.clock()
        return ClientRequest(client, self._rid, "text", "text", True, "f32", None, items,
                             now + deadline_s, now)

    def submit(self, *reqs: ClientRequest) -> None:
        assert self.flow.submit(list(reqs), self.clock()) == []

    def engine_requests(self) -> list[tuple[dict[str, Any], list[str]]]:
        return [(msgpack.unpackb(m[3]), msgpack.unpackb(m[4])) for m in self.back.sent]

    def engine_reply(self, tok: int, n: int, status: int = p.OK) -> np.ndarray:
        """The engine answers ``tok`` with rows i+1, i+2, ... (distinct per position)."""
        rows = np.arange(1, n * DIM + 1, dtype=np.float32).reshape(n, DIM)
        words = to_bf16(rows).tobytes() if status == p.OK else b""
        header = {"tok": tok, "status": status, "dtype": "bf16", "shape": [n, DIM]}
        if status != p.OK:
            header["error"] = "boom"
        self.flow.on_reply(self.state.engines[ENGINE], header, zmq.Frame(words), self.clock())
        return rows


def vectors(msg: list[Any]) -> np.ndarray:
    header = msgpack.unpackb(msg[2])
    return np.frombuffer(msg[3], "<f4").reshape(header["shape"])


def test_miss_goes_to_the_engine_and_the_reply_fills_client_and_cache() -> None:
    b = Broker()
    b.submit(b.request(["a", "b"]))
    [(header, items)] = b.engine_requests()
    assert items == ["a", "b"] and header["n"] == 2 and header["deadline_ms"] == 10_000
    assert b.state.engines[ENGINE].credits_free == 6  # 2 of 8 taken
    assert b.front.sent == []  # nothing answered before the engine replies
    rows = b.engine_reply(header["tok"], 2)
    [msg] = b.front.to(CLIENT)
    assert msgpack.unpackb(msg[2])["cached"] == 0
    np.testing.assert_array_equal(vectors(msg), rows)
    assert b.state.engines[ENGINE].credits_free == 8
    # The same inputs again: all from the cache, the engine sees nothing new.
    b.submit(b.request(["b", "a"]))
    assert len(b.back.sent) == 1
    again = b.front.to(CLIENT)[1]
    assert msgpack.unpackb(again[2])["cached"] == 2
    np.testing.assert_array_equal(vectors(again), rows[::-1])


def test_duplicates_and_concurrent_identical_requests_cost_one_item() -> None:
    b = Broker()
    first, second = b.request(["x", "x", "x"]), b.request(["x"])
    b.submit(first, second)
    [(header, items)] = b.engine_requests()
    assert items == ["x"]  # three copies in one request and one in another: computed once
    assert b.state.engines[ENGINE].credits_free == 7
    b.engine_reply(header["tok"], 1)
    answers = {msgpack.unpackb(m[2])["id"]: vectors(m) for m in b.front.to(CLIENT)}
    assert answers.keys() == {first.rid, second.rid}
    assert (answers[first.rid] == answers[second.rid][0]).all()


def test_admission_counts_distinct_misses_after_the_cache() -> None:
    b = Broker(credits=4)
    b.submit(b.request(["a", "b", "c", "d", "e"]))  # 5 distinct > 4 credits: never fits
    [err] = headers(b.front, CLIENT, 2)
    assert err["status"] == p.TOO_LARGE
    b.submit(b.request(["a", "a", "a", "a", "a", "b"]))  # n=6, but 2 distinct: admitted
    [(header, _)] = b.engine_requests()
    assert header["n"] == 2
    b.submit(b.request(["c", "d", "e"]))  # 3 more than the 2 left: refused for now
    refusal = headers(b.front, CLIENT, 2)[-1]
    assert refusal["status"] == p.OVERLOADED and refusal["retry_after_ms"] > 0
    assert len(b.engine_requests()) == 1


def test_deadline_answers_504_but_credits_wait_for_the_engine() -> None:
    b = Broker()
    req = b.request(["slow"], deadline_s=0.5)
    b.submit(req)
    [(header, _)] = b.engine_requests()
    b.clock.t += 0.4
    b.flow.expire(b.clock())
    assert b.front.sent == []
    b.clock.t += 0.2
    b.flow.expire(b.clock())
    [late] = headers(b.front, CLIENT, 2)
    assert late["status"] == p.DEADLINE_EXCEEDED and late["id"] == req.rid
    assert b.state.engines[ENGINE].credits_free == 7  # still held: the engine is working
    b.engine_reply(header["tok"], 1)
    assert b.state.engines[ENGINE].credits_free == 8
    assert len(b.front.sent) == 1  # answered once only


def test_engine_error_and_engine_loss_fail_every_waiter_once() -> None:
    b = Broker()
    r1, r2 = b.request(["p"]), b.request(["q"])
    b.submit(r1)
    b.submit(r2)
    (h1, _), _ = b.engine_requests()
    b.engine_reply(h1["tok"], 1, status=p.ENGINE_ERROR)
    b.flow.on_engine_lost(b.state.remove(ENGINE), "heartbeat expired")
    statuses = {h["id"]: h["status"] for h in headers(b.front, CLIENT, 2)}
    assert statuses == {r1.rid: p.ENGINE_ERROR, r2.rid: p.UNAVAILABLE}


def test_unreachable_engine_is_reported_to_the_loop() -> None:
    b = Broker()
    b.back.gone.add(ENGINE)
    assert b.flow.submit([b.request(["z"])], b.clock()) == [ENGINE]


# -- the reply backlog --------------------------------------------------------------------


def replier(limit: int = 1000) -> tuple[Replier, FakeSocket, Clock, dict[str, int]]:
    clock, sock, counters = Clock(), FakeSocket(), {"client_gone": 0}
    return Replier(sock, BrokerState(("text",)), counters, clock=clock,
                   max_backlog_bytes=limit), sock, clock, counters


def frames(tag: bytes, size: int = 100) -> list[bytes]:
    return [p.CLIENT_PROTO, tag, b"\0" * (size - len(tag) - 4)]


def test_full_pipe_defers_replies_in_order_until_the_client_reads() -> None:
    r, sock, _, counters = replier()
    sock.full.add(CLIENT)
    for i in range(3):
        r.send(CLIENT, frames(b"%d" % i))
    assert sock.sent == [] and r.waiting
    assert counters["replies_deferred"] == 3 and r.snapshot()["backlog_bytes"] == 300
    r.flush()
    assert sock.sent == []  # still full: nothing lost, nothing sent
    sock.full.clear()
    r.send(CLIENT, frames(b"3"))  # behind what waits, not ahead of it
    assert [m[2] for m in sock.sent] == [b"0", b"1", b"2", b"3"]
    assert not r.waiting and r.snapshot()["backlog_bytes"] == 0
    assert counters["replies_dropped"] == 0 and not r.refuses(CLIENT)


def test_client_over_its_backlog_is_cut_off_until_a_send_succeeds() -> None:
    r, sock, _, counters = replier(limit=250)
    sock.full.add(CLIENT)
    for i in range(3):  # the third makes 300 bytes > 250
        r.send(CLIENT, frames(b"%d" % i))
    assert r.refuses(CLIENT) and not r.waiting
    assert counters["clients_cut_off"] == 1 and counters["replies_dropped"] == 3
    assert r.snapshot() == {"backlog_bytes": 0, "backlog_clients": 0, "queued_large_bytes": 0,
                            "cut_off_clients": 1}
    r.send(CLIENT, frames(b"x"))  # still not reading: dropped, not held
    assert counters["replies_dropped"] == 4 and not r.waiting
    r.send(b"other", frames(b"y"))  # others are not affected
    assert [m[0] for m in sock.sent] == [b"other"]
    sock.full.clear()
    r.send(CLIENT, frames(b"z"))  # it reads again
    assert not r.refuses(CLIENT)


def test_backlog_drops_replies_past_their_deadline_and_of_gone_clients() -> None:
    r, sock, clock, counters = replier()
    sock.full.update({CLIENT, b"leaver"})
    r.send(CLIENT, frames(b"old"), deadline=clock.t + 1)
    r.send(CLIENT, frames(b"untimed"))
    r.send(b"leaver", frames(b"l"))
    clock.t += 2
    sock.full.clear()
    sock.gone.add(b"leaver")
    r.flush()
    assert [m[2] for m in sock.sent] == [b"untimed"]  # the expired one was dropped
    assert counters["replies_dropped"] == 2 and counters["client_gone"] == 1
    assert not r.waiting and r.snapshot()["backlog_bytes"] == 0


def test_untimed_replies_are_held_for_the_default_deadline_only() -> None:
    r, sock, clock, counters = replier()
    sock.full.add(CLIENT)
    r.send(CLIENT, frames(b"mgmt"))
    clock.t += UNTIMED_HOLD_S + 0.1
    r.flush()
    assert not r.waiting and counters["replies_dropped"] == 1


@pytest.mark.parametrize("gone_first", [True, False])
def test_send_to_a_gone_client_is_counted_not_raised(gone_first: bool) -> None:
    r, sock, _, counters = replier()
    if not gone_first:
        sock.full.add(CLIENT)
        r.send(CLIENT, frames(b"held"))
        sock.full.clear()
    sock.gone.add(CLIENT)
    r.send(CLIENT, frames(b"late"))
    assert counters["client_gone"] == 1 and not r.waiting


def test_large_replies_queued_in_libzmq_are_bounded_in_bytes() -> None:
    """The pipe takes large replies only up to the byte bound; written ones free the room."""
    r, sock, _, counters = replier(limit=3 * TRACK_MIN_BYTES)
    big = TRACK_MIN_BYTES
    for i in range(3):
        r.send(CLIENT, frames(b"%d" % i, big))
    assert len(sock.sent) == 3 and r.snapshot()["queued_large_bytes"] == 3 * big
    r.send(CLIENT, frames(b"3", big))  # libzmq would hold 4 x 16 KiB > the bound: held here
    assert len(sock.sent) == 3 and counters["replies_deferred"] == 1
    r.send(CLIENT, frames(b"small"))  # behind the held one, whatever its size
    assert len(sock.sent) == 3
    sock.trackers[0].done = True  # the oldest was written out
    r.flush()
    assert [m[2] for m in sock.sent[3:]] == [b"3", b"small"]
    assert r.snapshot()["queued_large_bytes"] == 3 * big and not r.waiting
    for t in sock.trackers:
        t.done = True
    r.flush()
    assert r.snapshot()["queued_large_bytes"] == 0 and not r.queued
    assert counters["replies_dropped"] == 0

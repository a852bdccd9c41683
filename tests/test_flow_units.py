"""The embed path (cache -> plan -> admit -> dispatch -> reply) and the reply backlog, driven
by a fake clock and fake sockets: every decision checked without processes or timing."""

from __future__ import annotations

import re
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
from zembed.cache.keys import item_keys, key_prefix

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

    def __init__(self, credits: int = 8, backlog_bytes: int = 1 << 20,
                 **ready: Any) -> None:
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
                                     "dim": DIM, "credits": credits, **ready}, self.clock())
        self._rid = 0

    def request(self, items: list[str], deadline_s: float = 10.0, client: bytes = CLIENT,
                dimensions: int | None = None, input_type: str | None = None) -> ClientRequest:
        self._rid += 1
        now = self.clock()
        return ClientRequest(client, self._rid, "text", "text", True, "f32", input_type, items,
                             now + deadline_s, now, dimensions)

    def submit(self, *reqs: ClientRequest) -> None:
        assert self.flow.submit(list(reqs), self.clock()) == []

    def engine_requests(self) -> list[tuple[dict[str, Any], list[str]]]:
        return [(msgpack.unpackb(m[3]), msgpack.unpackb(m[4])) for m in self.back.sent]

    def engine_reply(self, tok: int, n: int, status: int = p.OK, width: int = DIM
                     ) -> np.ndarray:
        """The engine answers ``tok`` with rows i+1, i+2, ... (distinct per position), each
        ``width`` wide (a truncated request's)."""
        rows = np.arange(1, n * width + 1, dtype=np.float32).reshape(n, width)
        words = to_bf16(rows).tobytes() if status == p.OK else b""
        header = {"tok": tok, "status": status, "dtype": "bf16", "shape": [n, width]}
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


# -- dimensions (Matryoshka truncation) and named prompts ------------------------------------


class CountingCache(MemoryCache):
    """A memory cache that remembers every key it was asked for."""

    def __init__(self) -> None:
        super().__init__(max_items=1000, ttl_s=3600)
        self.asked: list[bytes] = []

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        self.asked.extend(keys)
        return super().get_many(keys)


def counting(b: Broker) -> CountingCache:
    cache = CountingCache()
    b.cache = b.flow.cache = cache
    return cache


def last_header(b: Broker) -> dict[str, Any]:
    return headers(b.front, CLIENT, 2)[-1]


def test_a_truncated_request_asks_the_engine_for_its_width_and_is_cached_apart() -> None:
    b = Broker(dimensions=True)
    cache = counting(b)
    b.submit(b.request(["a", "b"], dimensions=2))
    [(header, items)] = b.engine_requests()
    assert header["dimensions"] == 2 and items == ["a", "b"]
    assert b.state.inflight[header["tok"]].dim == 2
    rows = b.engine_reply(header["tok"], 2, width=2)
    [msg] = b.front.to(CLIENT)
    assert msgpack.unpackb(msg[2])["shape"] == [2, 2]
    np.testing.assert_array_equal(vectors(msg), rows)
    assert all(b":n@2:-:" in key for key in cache.asked)
    # The same request again: every item from the 2-wide entries, no engine.
    b.submit(b.request(["b", "a"], dimensions=2))
    again = b.front.to(CLIENT)[1]
    assert msgpack.unpackb(again[2])["cached"] == 2 and len(b.back.sent) == 1
    np.testing.assert_array_equal(vectors(again), rows[::-1])
    # A full-width request of the same inputs is not served from them: the engine computes it.
    b.submit(b.request(["a", "b"]))
    (header2, _) = b.engine_requests()[1]
    assert "dimensions" not in header2
    full = b.engine_reply(header2["tok"], 2)
    last = b.front.to(CLIENT)[2]
    assert msgpack.unpackb(last[2])["shape"] == [2, DIM] and msgpack.unpackb(last[2])["cached"] == 0
    np.testing.assert_array_equal(vectors(last), full)


def test_asking_for_the_full_dim_is_the_request_without_dimensions() -> None:
    """Same key, same entry, and no ``dimensions`` for the engine: even on a lane that does
    not truncate."""
    b = Broker()
    b.submit(b.request(["a"]))
    [(header, _)] = b.engine_requests()
    rows = b.engine_reply(header["tok"], 1)
    b.submit(b.request(["a"], dimensions=DIM))
    again = b.front.to(CLIENT)[1]
    assert msgpack.unpackb(again[2])["cached"] == 1 and len(b.back.sent) == 1
    np.testing.assert_array_equal(vectors(again), rows)
    b.submit(b.request(["fresh"], dimensions=DIM))
    assert "dimensions" not in b.engine_requests()[1][0]


@pytest.mark.parametrize(("ready", "dims", "match"), [
    ({}, 2, "does not allow dimensions .* --dimensions on"),
    ({"dimensions": "yes"}, 2, "does not allow dimensions"),  # only a true bool counts
    ({"dimensions": True}, DIM + 1, f"dimensions must be at most {DIM} "),
    ({}, DIM + 1, f"dimensions must be at most {DIM} "),
])
def test_dimensions_the_lane_cannot_give_are_400_before_the_cache(
        ready: dict[str, Any], dims: int, match: str) -> None:
    b = Broker(**ready)
    cache = counting(b)
    b.submit(b.request(["a"], dimensions=dims))
    err = last_header(b)
    assert err["status"] == p.BAD_REQUEST
    assert re.search(match, err["error"]), err["error"]
    assert cache.asked == [] and b.back.sent == []
    assert b.state.stats["text"].requests[p.BAD_REQUEST] == 1


def test_dimensions_need_every_engine_of_the_lane_to_truncate() -> None:
    b = Broker(dimensions=True)
    b.state.register(b"engine-2", {"lane": "text", "kinds": ["text"], "fingerprint": "fp",
                                   "dim": DIM, "credits": 8}, b.clock())
    b.submit(b.request(["a"], dimensions=2))
    assert last_header(b)["status"] == p.BAD_REQUEST  # engine-2 could be the one to get it
    b.state.remove(b"engine-2")
    b.submit(b.request(["a"], dimensions=2))
    [(header, _)] = b.engine_requests()
    assert header["dimensions"] == 2
    b.state.remove(ENGINE)  # no engine left: what the last ones said stands
    assert b.state.models["text"].dimensions


def test_a_lane_without_a_known_model_answers_as_it_always_did() -> None:
    """No model yet: dimensions and prompts cannot be judged; the request gets the 503 of a
    lane without engines, not a new error."""
    b = Broker()
    b.state.models.clear()
    b.state.remove(ENGINE)
    b.submit(b.request(["a"], dimensions=2, input_type="nonsense"))
    err = last_header(b)
    assert err["status"] == p.UNAVAILABLE and "no engine serves lane 'text'" in err["error"]


def test_a_reply_of_the_wrong_width_is_an_engine_error() -> None:
    b = Broker(dimensions=True)
    b.submit(b.request(["a"], dimensions=2))
    [(header, _)] = b.engine_requests()
    b.engine_reply(header["tok"], 1)  # full width where 2 were asked for
    err = last_header(b)
    assert err["status"] == p.ENGINE_ERROR and "for 1x2 bf16" in err["error"]
    keys = item_keys(key_prefix("t", "text", "fp", True, None, 2), ["a"])
    assert b.cache.get_many([k for k in keys if k]) == [None]  # nothing cached from it


def test_prompts_the_model_announced_are_accepted_and_others_are_400_listing_them() -> None:
    b = Broker(prompts={"classification": "Classify: ", "clustering": "Cluster: ",
                        "bad name": "x", "num": 7},
               default_prompt="classification")
    model = b.state.models["text"]
    assert model.prompts == {"classification": "Classify: ", "clustering": "Cluster: "}
    b.submit(b.request(["a"], input_type="clustering"))
    b.submit(b.request(["a"], input_type="query"))  # always accepted
    sent = b.engine_requests()
    assert [h["input_type"] for h, _ in sent] == ["clustering", "query"]
    b.submit(b.request(["a"], input_type="retrieval"))
    err = last_header(b)
    assert err["status"] == p.BAD_REQUEST and len(b.engine_requests()) == 2
    assert "unknown prompt 'retrieval'" in err["error"]
    assert "classification, clustering" in err["error"]


def test_a_lane_without_prompts_says_so() -> None:
    b = Broker()
    b.submit(b.request(["a"], input_type="retrieval"))
    err = last_header(b)
    assert err["status"] == p.BAD_REQUEST and "prompts are none" in err["error"]


def test_info_and_stats_show_what_a_request_may_ask_of_the_model() -> None:
    b = Broker(dimensions=True, prompts={"query": "q: ", "passage": "p: "},
               default_prompt=None)
    lane = b.state.lane_info("text", b.clock(), 256)
    assert (lane["dimensions"], lane["prompts"], lane["default_prompt"]) == (
        True, ["passage", "query"], None)
    engine = b.state.lane_view("text", b.clock())["engines"][0]
    assert (engine["dimensions"], engine["prompts"]) == (True, ["passage", "query"])
    bare = BrokerState(("text",)).lane_info("text", 0.0, 256)
    assert (bare["dimensions"], bare["prompts"], bare["default_prompt"]) == (False, [], None)

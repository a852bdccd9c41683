"""Cache keys, values, the memory backend and the pending table, without sockets."""

from __future__ import annotations

import time
from typing import Any

import pytest

from zembed.broker.pending import ClientRequest, PendingTable, item_errors_by_position
from zembed.cache.backends import MemoryCache, NullCache, open_cache
from zembed.cache.keys import content_hash, item_keys, key_prefix
from zembed.cache.values import HEADER_BYTES, decode_value, encode_value

DIM = 4


def words(x: int) -> bytes:
    return bytes([x]) * (2 * DIM)


def test_keys_separate_everything_that_changes_a_vector() -> None:
    base = dict(prefix="zembed", kind="text", fingerprint="text-aaa", normalize=True,
                input_type=None)
    variants = [dict(base), {**base, "normalize": False}, {**base, "fingerprint": "text-bbb"},
                {**base, "kind": "clip-text"}, {**base, "input_type": "query"},
                {**base, "prefix": "other"}]
    keys = {item_keys(key_prefix(**v), ["same text"])[0] for v in variants}  # type: ignore[arg-type]
    assert len(keys) == len(variants)
    prefix = key_prefix("zembed", "text", "text-aaa", True, None)
    assert prefix == b"zembed:v1:text:text-aaa:n:-:"


def test_truncated_vectors_have_keys_of_their_own_and_full_ones_keep_theirs() -> None:
    """``dimensions`` is in the key as ``n@{d}``/``r@{d}``; without it (the full dim) the key
    is the one written before truncation existed, so an upgrade invalidates nothing."""
    assert key_prefix("zembed", "text", "fp", True, "query", 256) == (
        b"zembed:v1:text:fp:n@256:query:")
    assert key_prefix("zembed", "text", "fp", False, None, 64) == b"zembed:v1:text:fp:r@64:-:"
    full = key_prefix("zembed", "text", "fp", True, "query", None)
    assert full == key_prefix("zembed", "text", "fp", True, "query") == (
        b"zembed:v1:text:fp:n:query:")
    widths = [None, 64, 128, 256]
    keys = {item_keys(key_prefix("z", "text", "fp", True, None, d), ["same"])[0] for d in widths}
    assert len(keys) == len(widths)


def test_content_hash() -> None:
    assert content_hash("é") == content_hash("é") != content_hash("e")
    assert content_hash(b"\x89PNG") != content_hash("\x89PNG")
    assert content_hash("https://example.com/a.jpg") is None  # URLs are never cached
    assert content_hash("data:image/png;base64,AAAA") is not None
    assert len(content_hash("x") or b"") == 32


def test_values_round_trip_and_reject_mismatches() -> None:
    value = encode_value(words(7), DIM)
    assert len(value) == HEADER_BYTES + 2 * DIM
    assert decode_value(value, DIM) == words(7)
    assert decode_value(value, DIM + 1) is None  # another model's dimension
    assert decode_value(value[:-1], DIM) is None  # truncated
    assert decode_value(b"XX" + value[2:], DIM) is None  # foreign value
    assert decode_value(b"", DIM) is None
    short = encode_value(words(7)[:2 * (DIM - 1)], DIM - 1)  # a truncated vector's value
    assert decode_value(short, DIM - 1) == words(7)[:2 * (DIM - 1)]
    assert decode_value(short, DIM) is None  # never served for another width


def test_memory_cache_is_a_bounded_lru_with_ttl() -> None:
    cache = MemoryCache(max_items=2, ttl_s=60)
    cache.set_many([(b"a", b"1"), (b"b", b"2")])
    assert cache.get_many([b"a"]) == [b"1"]  # a is now the most recent
    cache.set_many([(b"c", b"3")])
    assert cache.get_many([b"a", b"b", b"c"]) == [b"1", None, b"3"]
    assert cache.state()["evictions"] == 1
    short = MemoryCache(max_items=10, ttl_s=0.05)
    short.set_many([(b"k", b"v")])
    time.sleep(0.06)
    assert short.get_many([b"k"]) == [None]


def test_open_cache_specs() -> None:
    assert isinstance(open_cache("off", ttl_s=1, timeout_s=0.05, memory_items=10), NullCache)
    assert isinstance(open_cache("memory", ttl_s=1, timeout_s=0.05, memory_items=10),
                      MemoryCache)
    with pytest.raises(ValueError, match="redis://"):
        open_cache("mongodb://x", ttl_s=1, timeout_s=0.05, memory_items=10)


def request(keys: list[bytes | None], deadline: float = 10.0) -> ClientRequest:
    req = ClientRequest(b"client", 1, "text", "text", True, "f32", None,
                        [k.decode() if k else "u" for k in keys], deadline, 0.0)
    req.keys = keys
    return req


def test_plan_fills_hits_and_dedupes_within_a_request() -> None:
    table = PendingTable()
    req = request([b"a", b"b", b"a", None, b"c"])
    plan = table.plan(req, [None, words(1), None, None, None], DIM, 0.0)
    assert plan.send == [0, 3, 4] and plan.duplicates == [(2, 0)]
    assert req.cached == [1] and req.missing == 4
    table.launch(7, req, plan)
    rows = memoryview(words(10) + words(11) + words(12))
    done, fresh = table.land(7, rows, {})
    assert done == [req] and req.missing == 0
    assert bytes(req.rows) == words(10) + words(1) + words(10) + words(11) + words(12)
    assert sorted(k for k, _ in fresh) == [b"a", b"c"]  # the uncacheable item is not written


def test_concurrent_identical_misses_share_one_flight() -> None:
    table = PendingTable()
    first, second = request([b"x", b"y"]), request([b"y", b"x", b"z"])
    table.launch(1, first, table.plan(first, [None, None], DIM, 0.0))
    plan = table.plan(second, [None, None, None], DIM, 0.0)
    assert plan.send == [2] and second.joined == 2
    table.launch(2, second, plan)
    done, _ = table.land(1, memoryview(words(1) + words(2)), {})
    assert done == [first] and second.missing == 1
    done, _ = table.land(2, memoryview(words(3)), {})
    assert done == [second]
    assert bytes(second.rows) == words(2) + words(1) + words(3)


def test_no_join_onto_a_flight_about_to_expire() -> None:
    table = PendingTable()
    early, late = request([b"x"], deadline=0.5), request([b"x"], deadline=5.0)
    table.launch(1, early, table.plan(early, [None], DIM, 0.0))
    assert table.plan(late, [None], DIM, 0.0).send == [0]  # would be dropped as expired
    later = request([b"y"], deadline=5.0)
    table.launch(2, later, table.plan(later, [None], DIM, 0.0))
    latest = request([b"y"], deadline=5.1)
    assert table.plan(latest, [None], DIM, 0.0).send == []  # 5 s left: safe to join


def test_item_errors_fail_one_row_and_are_not_cached() -> None:
    table = PendingTable()
    req = request([b"a", b"b"])
    table.launch(1, req, table.plan(req, [None, None], DIM, 0.0))
    errors = item_errors_by_position([[1, 400, "corrupt"], "junk", [9, 999, "x"]])
    assert errors == {1: (400, "corrupt"), 9: (500, "x")}
    done, fresh = table.land(1, memoryview(words(1) + bytes(2 * DIM)), errors)
    assert done == [req] and req.item_errors == [[1, 400, "corrupt"]]
    assert [k for k, _ in fresh] == [b"a"]


def test_fail_and_expire() -> None:
    table = PendingTable()
    a, b = request([b"x"], deadline=1.0), request([b"x"], deadline=1.0)
    table.launch(1, a, table.plan(a, [None], DIM, 0.0))
    table.plan(b, [None], DIM, 0.0)  # joins a's flight
    table.track(a)
    table.track(b)
    assert table.next_deadline() == 1.0
    assert table.expire(0.5) == []
    assert set(map(id, table.fail(1))) == {id(a), id(b)}
    assert table.fail(1) == []  # a flight fails once
    a.answered = True
    assert table.expire(1.5) == [b]


def test_a_plain_redis_turn_stops_near_its_budget(module_redis: Any) -> None:
    """60k keys against a 10 ms budget: MGET chunks stop near the budget; the keys not reached
    are misses (``reads_cut``), the ones read are hits."""
    from zembed.cache.backends import RedisCache

    cache = RedisCache(module_redis.url, ttl_s=60, timeout_s=0.5)
    try:
        module_redis.client().mset({f"zt:plain:{i}": b"v%d" % i for i in range(2000)})
        cache.timeout_s = 0.01
        keys = [f"zt:plain:{i}".encode() for i in range(60_000)]
        t0 = time.monotonic()
        values = cache.get_many(keys)
        took = time.monotonic() - t0
        assert len(values) == 60_000 and cache.reads_cut > 0 and took < 0.25, took
        assert values[0] == b"v0" and not cache.read_failed
        assert cache.state()["reads_cut"] == cache.reads_cut
    finally:
        cache.close()


def test_lane_records_round_trip_and_reject_junk() -> None:
    import msgpack

    from zembed.broker.lanerecord import LaneRecords, decode, encode, record_key
    from zembed.broker.state import LaneModel

    model = LaneModel(384, {"text": "text-abc"}, dimensions=True, prompts={"query": "q: "},
                      default_prompt=None)
    assert decode(encode(model)) == model
    for junk in (b"", b"\x00", msgpack.packb({"dim": 0, "fingerprints": {"text": "x"}}),
                 msgpack.packb({"dim": 3, "fingerprints": {}}),
                 msgpack.packb({"dim": 3, "fingerprints": {"text": 1}}), msgpack.packb([1])):
        assert decode(junk) is None
    cache = MemoryCache(10, 60)
    LaneRecords(cache, "zp").publish("text", model)
    assert cache.get_many([record_key("zp", "text")])[0] == encode(model)
    models: dict[str, LaneModel] = {}
    assert LaneRecords(cache, "zp").restore(("text", "image"), models) == ["text"]
    assert models == {"text": model}

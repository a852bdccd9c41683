"""The cache on Redis Cluster (issue 16): slot-grouped, time-bounded, failover costs misses.

Every test here runs against a real cluster of 3 masters and 3 replicas that the tests start
on loopback (tests/rediscluster.py); brokers and engines are the real ones.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Stack
from rediscluster import RedisCluster

from zembed.cache.backends import open_cache
from zembed.cache.cluster import RedisClusterCache, parse_url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One cluster for the tests that do not kill its nodes."""
    c = RedisCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster a test may kill a master of."""
    c = RedisCluster(tmp_path / "cluster")
    try:
        c.start()
        yield c
    finally:
        c.stop()


def keys_and_values(n: int, tag: str) -> list[tuple[bytes, bytes]]:
    return [(f"zt:{tag}:{i}".encode(), os.urandom(16)) for i in range(n)]


def wait_written(cache: RedisClusterCache, n: int, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while cache.written < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.written >= n, cache.state()


def test_cluster_urls() -> None:
    seeds = parse_url("redis+cluster://a:7000,b:7001")
    assert seeds.nodes == (("a", 7000), ("b", 7001)) and not seeds.tls
    seeds = parse_url("rediss+cluster://u:p%40ss@a:7000")
    assert seeds.tls and seeds.username == "u" and seeds.password == "p@ss"
    for bad in ("redis://a:1", "redis+cluster://a", "redis+cluster://"):
        with pytest.raises(ValueError):
            parse_url(bad)
    with pytest.raises(ValueError, match="redis\\+cluster://"):
        open_cache("cluster://a:1", ttl_s=60, timeout_s=0.05, memory_items=10)


def test_round_trip_over_every_master(cluster: RedisCluster) -> None:
    cache = open_cache(cluster.url, ttl_s=60, timeout_s=0.5, memory_items=10)
    assert isinstance(cache, RedisClusterCache)
    try:
        state = cache.state()
        assert state["backend"] == "redis-cluster" and state["up"]
        assert len(state["nodes"]) == 3 and state["slots_covered"] == 16384
        items = keys_and_values(3000, "rt")
        cache.set_many(items)
        wait_written(cache, 3000)
        values = cache.get_many([k for k, _ in items] + [b"zt:rt:absent"])
        assert values == [v for _, v in items] + [None]
        assert not cache.read_failed
        # Every master holds a share (the keys were spread by slot, not sent to one node).
        for node in cluster.nodes:
            role = node.client().execute_command("ROLE")[0]
            if role == b"master":
                assert node.client().dbsize() > 500
    finally:
        cache.close()


def test_a_turn_never_waits_much_past_its_budget(cluster: RedisCluster) -> None:
    """60k keys against a 10 ms budget: the lookup stops near the budget, the keys it did not
    reach are misses (counted), the ones it read are hits."""
    cache = RedisClusterCache(cluster.url, ttl_s=60, timeout_s=0.5)
    try:
        items = keys_and_values(2000, "budget")
        cache.set_many(items)
        wait_written(cache, 2000)
        cache.timeout_s = 0.01
        keys = [k for k, _ in items] + [f"zt:budget:miss:{i}".encode() for i in range(58_000)]
        t0 = time.monotonic()
        values = cache.get_many(keys)
        took = time.monotonic() - t0
        assert len(values) == len(keys)
        assert cache.reads_cut > 0 and took < 0.25, (took, cache.reads_cut)
        hits = [v for v in values[:2000] if v is not None]
        assert hits and all(v == dict(items)[k] for k, v in zip(keys, values, strict=False)
                            if v is not None)
    finally:
        cache.close()


def test_a_killed_master_costs_misses_then_hits_resume(own_cluster: RedisCluster) -> None:
    cache = RedisClusterCache(own_cluster.url, ttl_s=60, timeout_s=0.2)
    try:
        items = keys_and_values(600, "fo")
        cache.set_many(items)
        wait_written(cache, 600)
        victim = own_cluster.master_of(items[0][0])
        victim.client().execute_command("WAIT", 1, 2000)  # replicated before the kill
        victim.kill()
        keys = [k for k, _ in items]
        t0 = time.monotonic()
        values = cache.get_many(keys)  # never raises, never hangs
        assert time.monotonic() - t0 < 1.0
        assert values[0] is None  # the dead master's keys: misses
        assert any(v is not None for v in values)  # the other masters still answer
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            values = cache.get_many(keys)
            if all(v is not None for v in values):
                break
            time.sleep(0.2)
        assert values == [v for _, v in items], cache.state()  # the promoted replica serves
        assert cache.refreshes >= 2
    finally:
        cache.close()


def test_brokers_share_the_cluster_cache_and_a_new_broker_hits_before_any_engine(
        cluster: RedisCluster, stack_factory: Callable[[], Stack]) -> None:
    a, b = stack_factory(), stack_factory()
    a.start_broker("--cache", cluster.url)
    a.start_text()
    a.wait_engines("text", 1)
    texts = ["shared cluster cache one", "shared cluster cache two"]
    with a.client() as ca:
        first = ca.embed(*("text", "text"), texts)
        assert first.cached == 0
        deadline = time.monotonic() + 10
        while ca.embed("text", "text", texts).cached < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = ca.ready()
        assert ready["topology"]["cache"]["backend"] == "redis-cluster"
        assert len(ready["topology"]["cache"]["nodes"]) == 3
    # Broker b has never seen an engine: the lane record a wrote lets it answer hits.
    b.start_broker("--cache", cluster.url)
    with b.client() as cb:
        deadline = time.monotonic() + 20
        while True:
            try:
                hit = cb.embed("text", "text", texts)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert hit.cached == 2
        assert (hit.vectors == first.vectors).all()
    # zembed cache stats and purge visit every master of the cluster.
    from zembed.tools import cachetool

    masters = cachetool.redis_clients(cluster.url)
    assert len(masters) == 3
    usage = cachetool.redis_usage(masters, "zembed")
    assert usage["nodes"] == 3 and usage["keys"] >= 2
    assert {g["kind"] for g in usage["groups"]} == {"text"}
    assert cachetool.purge(masters, "zembed", "text", None) == usage["keys"]
    assert cachetool.redis_usage(masters, "zembed")["keys"] == 0


def test_a_master_killed_under_load_fails_no_request(
        own_cluster: RedisCluster, stack_factory: Callable[[], Stack]) -> None:
    stack = stack_factory()
    stack.start_broker("--cache", own_cluster.url, "--cache-timeout-ms", "100")
    stack.start_text()
    stack.wait_engines("text", 1)
    texts = [f"load under failover {i}" for i in range(40)]
    with stack.client(timeout=20, retries=None) as c:
        for i in range(0, 40, 8):
            c.embed_texts(texts[i:i + 8])
        time.sleep(0.5)  # written behind the replies
        victim = own_cluster.master_of(b"x")
        for node in own_cluster.nodes:
            if node.popen is not None and node.client().execute_command("ROLE")[0] == b"master":
                node.client().execute_command("WAIT", 1, 2000)
        assert victim.popen is not None
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(5)
        served = 0
        hits_after = 0
        t_end = time.monotonic() + 12
        while time.monotonic() < t_end:  # bounded: about 12 s of requests
            for i in range(0, 40, 8):
                result = c.embed("text", "text", texts[i:i + 8])  # raises on any failure
                served += 1
                if time.monotonic() > t_end - 3:
                    hits_after += result.cached
        stats = c.stats()
    assert served >= 20
    assert hits_after > 0  # hits resumed after the failover
    assert stats["cache"]["refreshes"] >= 2

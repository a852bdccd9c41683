"""The BF16 cache in front of real engines, on a real Redis the tests start (and kill)."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    RedisServer,
    Stack,
    hit_when_written,
    new_stack,
    tiny_args,
    wait_until,
)
from images import jpeg, png

from zembed.client import Client, EngineUnavailable


def fresh(n: int) -> list[str]:
    """Inputs no earlier test has cached."""
    tag = uuid.uuid4().hex[:8]
    return [f"sentence {i} about shoes {tag}" for i in range(n)]


def lane_stats(c: Client, lane: str = "text") -> dict[str, Any]:
    return c.stats()["lanes"][lane]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cached(module_redis: RedisServer, tiny: tuple[Path, Path]) -> Iterator[Stack]:
    stack = new_stack()
    try:
        stack.start_broker("--lanes", "text,image", "--cache", module_redis.url,
                           "--heartbeat-interval-ms", "1000")
        stack.engine = stack.start_text("--heartbeat-interval-ms", "1000")
        stack.start_image(*tiny_args(tiny))
        stack.wait_engines("text", 1)
        stack.wait_engines("image", 1)
        yield stack
    finally:
        stack.close()


@pytest.fixture
def client(cached: Stack) -> Iterator[Client]:
    with cached.client(timeout=20) as c:
        yield c


def test_cached_vectors_are_bit_identical(client: Client) -> None:
    tag = uuid.uuid4().hex
    calls: list[Callable[[], Any]] = [
        lambda: client.embed("text", "text", [f"a {tag}", f"b {tag}"]),
        lambda: client.embed("image", "clip-text", [f"a red shoe {tag}"]),
        lambda: client.embed("image", "image", [png(int(tag[:6], 16) % 1000), jpeg(7)]),
    ]
    for call in calls:
        first = call()
        assert first.cached == 0
        second = hit_when_written(call)  # write-back is asynchronous: wait until it landed
        assert second.cached_items == list(range(len(second.vectors)))
        assert first.vectors.tobytes() == second.vectors.tobytes()  # bit for bit
    texts = [f"bf16 {tag}"]
    computed = client.embed("text", "text", texts, dtype="bf16")
    hit = hit_when_written(lambda: client.embed("text", "text", texts, dtype="bf16"))
    assert computed.cached == 0
    assert np.array_equal(computed.vectors, hit.vectors)


def test_normalize_flag_never_shares_an_entry(client: Client) -> None:
    texts = fresh(2)
    unit = client.embed("text", "text", texts, normalize=True)
    raw = client.embed("text", "text", texts, normalize=False)
    assert raw.cached == 0  # not served from the normalised entries
    hit_when_written(lambda: client.embed("text", "text", texts, normalize=False))
    again = hit_when_written(lambda: client.embed("text", "text", texts, normalize=True))
    assert np.array_equal(again.vectors, unit.vectors)


def test_only_misses_reach_the_engine_and_spend_credits(client: Client) -> None:
    texts = fresh(10)
    client.embed_texts(texts[:7])
    hit_when_written(lambda: client.embed("text", "text", texts[:7]))
    before = lane_stats(client)
    result = client.embed("text", "text", texts)
    after = lane_stats(client)
    assert result.cached == 7 and result.cached_items == list(range(7))
    assert after["items_dispatched"] - before["items_dispatched"] == 3
    assert after["cache_hits"]["text"] - before["cache_hits"]["text"] == 7
    assert after["cache_misses"]["text"] - before["cache_misses"]["text"] == 3


def test_duplicates_and_concurrent_identical_misses_reach_the_model_once(
    cached: Stack, client: Client,
) -> None:
    texts = fresh(2)
    engine = cached.engine
    assert engine is not None
    before = lane_stats(client)
    engine.signal(signal.SIGSTOP)  # hold the first flight so the others must join it
    try:
        pending = [client.submit("text", "text", texts + texts) for _ in range(5)]
        time.sleep(0.2)
    finally:
        engine.signal(signal.SIGCONT)
    results = [client.result(p) for p in pending]
    after = lane_stats(client)
    for r in results:
        assert r.vectors.shape == (4, 384)
        assert np.array_equal(r.vectors, results[0].vectors)
        assert np.array_equal(r.vectors[:2], r.vectors[2:])
    assert after["items_dispatched"] - before["items_dispatched"] == 2  # two inputs, once each
    # The 4 later requests join the first one's flight with all 4 of their items.
    assert after["single_flight_joins"] - before["single_flight_joins"] == 16


def test_keys_in_redis_follow_the_documented_layout(client: Client,
                                                    module_redis: RedisServer) -> None:
    text = fresh(1)
    client.embed_texts(text)
    fingerprint = lane_stats(client)["engines"][0]["fingerprint"]
    import hashlib

    digest = hashlib.blake2b(text[0].encode(), digest_size=16).hexdigest()
    key = f"zembed:v1:text:{fingerprint}:n:-:{digest}"
    r = module_redis.client()
    wait_until(lambda: r.exists(key) == 1, 5)
    value = r.get(key)
    assert value[:2] == b"ZV" and len(value) == 6 + 2 * 384
    assert 0 < r.ttl(key) <= 7 * 24 * 3600
    r.close()


def test_corrupt_entry_is_a_counted_miss_then_overwritten(client: Client,
                                                          module_redis: RedisServer) -> None:
    text = fresh(1)
    good = client.embed_texts(text)
    hit_when_written(lambda: client.embed("text", "text", text))
    r = module_redis.client()
    keys = [k for k in r.scan_iter(match=b"zembed:v1:text:*") if r.get(k) and k.endswith(
        __import__("hashlib").blake2b(text[0].encode(), digest_size=16).hexdigest().encode())]
    assert len(keys) == 1
    r.set(keys[0], b"ZV\x01\x01\x10\x00short")  # wrong length for dim 384
    before = client.stats()["cache"]["corrupt"]
    result = client.embed("text", "text", text)
    assert result.cached == 0 and np.array_equal(result.vectors, good)
    assert client.stats()["cache"]["corrupt"] == before + 1
    wait_until(lambda: len(r.get(keys[0]) or b"") == 6 + 2 * 384, 5)  # rewritten
    assert np.array_equal(hit_when_written(lambda: client.embed("text", "text", text)).vectors,
                          good)
    r.close()


def test_all_hits_need_no_engine_and_new_weights_never_hit_old_entries(
    module_redis: RedisServer,
) -> None:
    stack = new_stack()
    try:
        stack.start_broker("--cache", module_redis.url)
        engine = stack.start_text()
        stack.wait_engines("text", 1)
        texts = fresh(3)
        with stack.client(timeout=10) as c:
            want = c.embed_texts(texts)
            hit_when_written(lambda: c.embed("text", "text", texts))
            engine.signal(signal.SIGKILL)
            wait_until(lambda: not lane_stats(c)["engines"])
            hit = c.embed("text", "text", texts)  # no engine at all: answered from the cache
            assert hit.cached == 3 and np.array_equal(hit.vectors, want)
            with pytest.raises(EngineUnavailable):
                c.embed_texts(fresh(1))  # a miss still needs an engine
            # Another model configuration (max length) is another fingerprint: no old hits.
            stack.start_text("--max-length", "64")
            stack.wait_engines("text", 1)
            other = c.embed("text", "text", texts)
            assert other.cached == 0
            hit_when_written(lambda: c.embed("text", "text", texts))
    finally:
        stack.close()


def test_redis_killed_and_restarted(redis_server: RedisServer) -> None:
    stack = new_stack()
    try:
        stack.start_broker("--cache", redis_server.url)
        stack.start_text()
        stack.wait_engines("text", 1)
        with stack.client(timeout=10) as c:
            warm = fresh(2)
            c.embed_texts(warm)
            wait_until(lambda: c.embed("text", "text", warm).cached == 2)
            redis_server.kill()
            for _ in range(5):  # every request still succeeds, from the models
                assert c.embed("text", "text", fresh(2)).vectors.shape == (2, 384)
            assert c.embed("text", "text", warm).cached == 0
            assert c.stats()["cache"]["up"] is False and c.stats()["cache"]["errors"] > 0
            redis_server.start()
            again = fresh(2)

            def hits_resume() -> bool:
                c.embed_texts(again)
                return c.embed("text", "text", again).cached == 2

            wait_until(hits_resume, 20)
            assert c.stats()["cache"]["up"] is True
    finally:
        stack.close()


def test_cache_cli_warm_stats_purge(cached: Stack, module_redis: RedisServer,
                                    tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    texts = fresh(5)
    (tmp_path / "inputs.txt").write_text("\n".join(texts) + "\n\n")
    z = [sys.executable, "-m", "zembed", "cache"]
    where = ["--endpoint", cached.frontend]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([*z, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        return out

    warmed = json.loads(run("warm", str(tmp_path / "inputs.txt"), *where).stdout)
    assert warmed["items"] == 5 and warmed["failed"] == 0
    with cached.client() as c:
        hit_when_written(lambda: c.embed("text", "text", texts))
        hit_when_written(lambda: c.embed("image", "image", [png(77)]))
    stats = json.loads(run("stats", "--json", "--redis", module_redis.url, *where).stdout)
    assert stats["broker"]["kinds"]["text"]["hits"] >= 5
    assert 0 < stats["broker"]["kinds"]["text"]["hit_ratio"] <= 1
    with cached.client() as c:
        fingerprint = lane_stats(c)["engines"][0]["fingerprint"]
    groups = {g["fingerprint"]: g for g in stats["redis"]["groups"]}
    assert groups[fingerprint]["keys"] >= 5
    assert groups[fingerprint]["bytes_estimate"] > 5 * 768
    purged = run("purge", "--model", fingerprint, "--redis", module_redis.url)
    assert int(purged.stdout.split()[1]) == groups[fingerprint]["keys"]
    left = json.loads(run("stats", "--json", "--redis", module_redis.url, *where).stdout)
    left_groups = {(g["kind"], g["fingerprint"]) for g in left["redis"]["groups"]}
    assert not any(fp == fingerprint for _, fp in left_groups)
    assert "image" in {kind for kind, _ in left_groups}  # other models untouched
    with cached.client() as c:
        assert c.embed("text", "text", texts).cached == 0  # gone from Redis
    refused = subprocess.run([*z, "purge", "--redis", module_redis.url], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "--all" in refused.stderr

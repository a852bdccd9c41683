"""A turn's cache lookup against its budget: 20k keys, ``cache_timeout_ms`` 50.

One unbudgeted MGET of 20k keys (the broker's lookup before issue 16) beside the budgeted
lookups of plain Redis (chunked MGETs) and of a Redis Cluster of 3 masters + 3 replicas that
this script starts on loopback (pipelined GETs per master). Values are 774 bytes, a framed
384-d BF16 vector. Median of 7 lookups each: wall time, keys answered, keys cut.

Usage: ``.venv/bin/python benchmarks/bench_cache_budget.py [--redis redis://127.0.0.1:6379/0]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rediscluster import RedisCluster
from stacks import machine

from zembed.cache.backends import RedisCache
from zembed.cache.cluster import RedisClusterCache

KEYS = 20_000
BUDGET_S = 0.05


def measure(cache: Any, keys: list[bytes]) -> dict[str, float]:
    times, found, cut = [], [], []
    for _ in range(7):
        before = cache.reads_cut
        t0 = time.monotonic()
        values = cache.get_many(keys)
        times.append(time.monotonic() - t0)
        found.append(sum(v is not None for v in values))
        cut.append(cache.reads_cut - before)
    return {"ms": round(statistics.median(times) * 1000, 1),
            "max_ms": round(max(times) * 1000, 1),
            "answered": statistics.median(found), "cut": statistics.median(cut)}


def fill(cache: Any, keys: list[bytes]) -> None:
    value = bytes(774)
    cache.set_many([(k, value) for k in keys])
    deadline = time.monotonic() + 60
    while cache.written < len(keys) and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    keys = [f"zbench:budget:{i}".encode() for i in range(KEYS)]
    plain = RedisCache(args.redis, ttl_s=600, timeout_s=5.0)
    fill(plain, keys)
    raw = []
    for _ in range(7):
        t0 = time.monotonic()
        plain.client.mget(keys)
        raw.append(time.monotonic() - t0)
    print(f"one MGET of {KEYS} keys (no budget): median {statistics.median(raw) * 1000:.1f} ms, "
          f"max {max(raw) * 1000:.1f} ms")
    plain.timeout_s = BUDGET_S
    print(f"plain Redis, budget {BUDGET_S * 1000:.0f} ms: {measure(plain, keys)}")
    plain.close()
    cluster = RedisCluster(Path(tempfile.mkdtemp()))
    cluster.start()
    try:
        cache = RedisClusterCache(cluster.url, ttl_s=600, timeout_s=5.0)
        fill(cache, keys)
        cache.timeout_s = BUDGET_S
        print(f"Redis Cluster (3 masters), budget {BUDGET_S * 1000:.0f} ms: "
              f"{measure(cache, keys)}")
        cache.close()
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()

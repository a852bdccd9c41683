"""``zembed cache stats|purge|warm``: look into, clean and fill the embedding cache.

Stats and purge talk to Redis directly (SCAN, never KEYS: a big keyspace is walked in
steps without blocking Redis); warm goes through the broker like any client, so the vectors
it stores are exactly what the engines compute.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from zembed.cache.keys import KEY_VERSION, fingerprint_pattern

SCAN_COUNT = 1000
#: How many keys per (kind, fingerprint) MEMORY USAGE samples to estimate bytes.
MEMORY_SAMPLES = 50


def redis_clients(url: str) -> list[Any]:
    """One client for plain Redis; one per master for ``redis+cluster://`` (SCAN walks one
    node's keys only, so stats and purge visit every master)."""
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from zembed.cache.cluster import master_clients

        return master_clients(url)
    import redis

    return [redis.Redis.from_url(url, socket_timeout=5)]


def scan_keys(client: Any, pattern: str) -> Iterator[bytes]:
    """Every key matching ``pattern``, by SCAN."""
    yield from client.scan_iter(match=pattern, count=SCAN_COUNT)


def redis_usage(clients: list[Any], prefix: str) -> dict[str, Any]:
    """Keys and estimated bytes per kind and fingerprint under ``prefix``, over every node
    (``used_memory`` and ``maxmemory`` summed; ``nodes`` how many were read)."""
    counts: Counter[tuple[str, str]] = Counter()
    estimate: Counter[tuple[str, str]] = Counter()
    used = maxmemory = 0
    policy = None
    for client in clients:
        node_counts: Counter[tuple[str, str]] = Counter()
        samples: dict[tuple[str, str], list[bytes]] = {}
        for key in scan_keys(client, f"{prefix}:{KEY_VERSION}:*"):
            parts = key.decode(errors="replace").split(":")
            if len(parts) < 7:
                continue
            group = (parts[2], parts[3])
            node_counts[group] += 1
            bucket = samples.setdefault(group, [])
            if len(bucket) < MEMORY_SAMPLES:
                bucket.append(key)
        for group, n in node_counts.items():
            sizes = [client.memory_usage(k) or 0 for k in samples[group]]
            estimate[group] += int(sum(sizes) / len(sizes) * n) if sizes else 0
        counts.update(node_counts)
        info = client.info("memory")
        used += int(info.get("used_memory") or 0)
        maxmemory += int(info.get("maxmemory") or 0)
        policy = policy or info.get("maxmemory_policy")
    groups = [{"kind": kind, "fingerprint": fingerprint, "keys": n,
               "bytes_estimate": estimate[(kind, fingerprint)]}
              for (kind, fingerprint), n in sorted(counts.items())]
    return {"groups": groups, "keys": sum(counts.values()),
            "bytes_estimate": sum(g["bytes_estimate"] for g in groups),
            "redis_used_memory": used, "redis_maxmemory": maxmemory,
            "redis_maxmemory_policy": policy, "nodes": len(clients)}


def broker_cache_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Hits, misses, hit ratio per kind from a broker ``stats`` answer, plus backend state."""
    kinds: dict[str, dict[str, Any]] = {}
    for lane in stats.get("lanes", {}).values():
        for kind, hits in lane.get("cache_hits", {}).items():
            kinds.setdefault(kind, {"hits": 0, "misses": 0})["hits"] += hits
        for kind, misses in lane.get("cache_misses", {}).items():
            kinds.setdefault(kind, {"hits": 0, "misses": 0})["misses"] += misses
    for row in kinds.values():
        total = row["hits"] + row["misses"]
        row["hit_ratio"] = round(row["hits"] / total, 4) if total else None
    return {"kinds": kinds, "backend": stats.get("cache", {})}


def purge(clients: list[Any], prefix: str, kind: str | None, fingerprint: str | None) -> int:
    """Delete (UNLINK) every key of ``kind`` and/or ``fingerprint`` on every node; returns
    how many. Keys go one UNLINK each in a pipeline (a cluster refuses one UNLINK of keys in
    several slots), a batch per SCAN step."""
    deleted = 0
    for client in clients:
        batch: list[bytes] = []
        for key in scan_keys(client, fingerprint_pattern(prefix, kind, fingerprint)):
            batch.append(key)
            if len(batch) >= SCAN_COUNT:
                deleted += _unlink(client, batch)
                batch.clear()
        if batch:
            deleted += _unlink(client, batch)
    return deleted


def _unlink(client: Any, keys: list[bytes]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.unlink(key)
    return sum(int(n) for n in pipe.execute())


def read_inputs(path: Path) -> Iterator[str]:
    """One input per non-blank line (texts, or image paths / URIs), read lazily."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def warm(client: Any, items: Iterable[Any], kind: str, batch: int | None,
         normalize: bool = True, input_type: str | None = None,
         dimensions: int | None = None) -> dict[str, Any]:
    """Embed every input through the broker (which stores the results) with ``embed_many``.

    Requests are sized from the broker's ``info`` and kept in flight to fill the lane; a 429
    puts a request back after the broker's ``retry_after``: warming never fails because the
    lane is busy, it only slows down. Inputs that fail (an unreadable image) are counted.
    ``input_type`` and ``dimensions`` are part of the cache key: warm what will be asked for.
    """
    done = cached = failed = 0
    t0 = time.perf_counter()
    for chunk in client.embed_many_iter(items, kind, normalize=normalize, input_type=input_type,
                                        dimensions=dimensions, batch_size=batch):
        done += len(chunk.vectors)
        cached += len(chunk.cached_items)
        failed += len(chunk.item_errors)
    return {"items": done, "already_cached": cached, "failed": failed,
            "seconds": round(time.perf_counter() - t0, 3)}

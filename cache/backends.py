"""Where cached vectors live: Redis, a bounded in-process LRU, or nowhere.

All backends share one contract that keeps the broker loop safe: ``get_many`` never raises
and never waits longer than the configured timeout (a failing Redis answers "all misses"),
and ``set_many`` never waits for Redis at all (a writer thread does the SETs).

Redis trouble trips a breaker: after a failure the backend stays "down" for a backoff period
(100 ms doubling to 5 s) during which it does not touch Redis, then tries again; the first
success closes the breaker. Errors are counted, never raised. When there is nothing to write,
the writer thread pings Redis once a second, so ``state()["up"]`` (and readiness) is true
to the facts even without traffic.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

log = logging.getLogger("zembed.cache")

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
#: The writer thread pings Redis after this long without writes.
PROBE_INTERVAL_S = 1.0
#: Keys per MGET (or pipelined chunk): a turn reads chunk by chunk while its budget
#: (``cache_timeout_ms``) can take one more, so 20k keys never cost 20k keys' wait.
CHUNK_KEYS = 1000


class Cache(Protocol):
    """A store of framed BF16 vectors by key."""

    name: str
    #: True when the last ``get_many`` could not ask the store (down or failing): its misses
    #: are errors, counted per lane in the stats.
    read_failed: bool

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """Values for ``keys`` (None = miss); never raises."""
        ...

    def set_many(self, items: list[tuple[bytes, bytes]]) -> None:
        """Store ``(key, value)`` pairs, best effort, without blocking the caller."""
        ...

    def state(self) -> dict[str, Any]:
        """Backend, health and error counters, for stats."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


class NullCache:
    """``cache = "off"``: every lookup misses, nothing is stored."""

    name = "off"
    read_failed = False

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return [None] * len(keys)

    def set_many(self, items: list[tuple[bytes, bytes]]) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"backend": self.name, "up": True}

    def close(self) -> None:
        pass


class MemoryCache:
    """Bounded in-process LRU with per-entry TTL: same keys and values as Redis."""

    name = "memory"
    read_failed = False

    def __init__(self, max_items: int, ttl_s: float) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._data: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self.evictions = 0

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        now = time.monotonic()
        out: list[bytes | None] = []
        for key in keys:
            entry = self._data.get(key)
            if entry is None or entry[0] <= now:
                out.append(None)
                continue
            self._data.move_to_end(key)
            out.append(entry[1])
        return out

    def set_many(self, items: list[tuple[bytes, bytes]]) -> None:
        expires = time.monotonic() + self.ttl_s
        for key, value in items:
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
        while len(self._data) > self.max_items:
            self._data.popitem(last=False)
            self.evictions += 1

    def state(self) -> dict[str, Any]:
        return {"backend": self.name, "up": True, "items": len(self._data),
                "max_items": self.max_items, "evictions": self.evictions}

    def close(self) -> None:
        self._data.clear()


class Breaker:
    """Down/up state of a remote store, with exponential backoff between attempts."""

    def __init__(self, what: str = "redis cache") -> None:
        self.what = what
        self.down_until = 0.0
        self.backoff_s = BACKOFF_MIN_S
        self.errors = 0
        self.is_down = False

    def allow(self, now: float) -> bool:
        """May we talk to the store now?"""
        return not self.is_down or now >= self.down_until

    def failed(self, now: float, exc: BaseException) -> None:
        self.errors += 1
        if not self.is_down:
            log.warning("%s unavailable (%s: %s); serving from the models", self.what,
                        type(exc).__name__, exc)
        else:
            self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)
        self.is_down = True
        self.down_until = now + self.backoff_s

    def succeeded(self) -> None:
        if self.is_down:
            log.warning("%s is back", self.what)
        self.is_down = False
        self.backoff_s = BACKOFF_MIN_S


class RedisCache:
    """Redis (``redis://``, ``rediss://`` for TLS, ``unix://`` for a socket), degrading safely.

    :param url: Redis URL.
    :param ttl_s: expiry of each entry (SET ... EX), seconds.
    :param timeout_s: socket timeout of each read, so a slow Redis cannot stall the broker.
    :param write_queue: most pending write batches before new ones are dropped (counted).
    """

    name = "redis"

    def __init__(self, url: str, *, ttl_s: int, timeout_s: float,
                 write_queue: int = 10_000) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.reads_cut = 0  # keys a turn's budget did not reach (misses)
        self.chunk_s = 0.0  # the slowest recent MGET chunk: what one more would cost
        self.breaker = Breaker()
        self.read_failed = False
        self.client = redis_client(url, timeout_s=timeout_s)
        self.writes_dropped = 0
        self.written = 0
        self._writes: queue.Queue[list[tuple[bytes, bytes]] | None] = queue.Queue(write_queue)
        self._writer = threading.Thread(target=self._write_loop, name="zembed-cache-writer",
                                        args=(redis_client(url, timeout_s=max(timeout_s, 1.0)),),
                                        daemon=True)
        self._writer.start()

    def ping(self) -> bool:
        """One round trip (used at start to choose between Redis and memory)."""
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        now = time.monotonic()
        self.read_failed = bool(keys) and not self.breaker.allow(now)
        if not keys or self.read_failed:
            return [None] * len(keys)
        values: list[bytes | None] = []
        deadline = now + self.timeout_s
        for start in range(0, len(keys), CHUNK_KEYS):
            began = time.monotonic()
            if start and began + self.chunk_s > deadline:
                # The turn's budget cannot take one more chunk: the rest are misses.
                self.reads_cut += len(keys) - start
                break
            try:
                values.extend(self.client.mget(keys[start:start + CHUNK_KEYS]))
            except Exception as exc:  # connection refused, timeout, protocol errors, ...
                self.breaker.failed(now, exc)
                self.read_failed = True
                return [None] * len(keys)
            self.chunk_s = max(time.monotonic() - began, self.chunk_s * 0.9)
        self.breaker.succeeded()
        return values + [None] * (len(keys) - len(values))

    def set_many(self, items: list[tuple[bytes, bytes]]) -> None:
        if not items or not self.breaker.allow(time.monotonic()):
            return
        try:
            self._writes.put_nowait(items)
        except queue.Full:
            self.writes_dropped += len(items)

    def _write_loop(self, client: Any) -> None:
        while True:
            try:
                items = self._writes.get(timeout=PROBE_INTERVAL_S)
            except queue.Empty:
                self._probe(client)
                continue
            if items is None:
                return
            try:
                pipe = client.pipeline(transaction=False)
                for key, value in items:
                    pipe.set(key, value, ex=self.ttl_s)
                pipe.execute()
                self.written += len(items)
            except Exception as exc:
                self.breaker.failed(time.monotonic(), exc)

    def _probe(self, client: Any) -> None:
        now = time.monotonic()
        if not self.breaker.allow(now):
            return
        try:
            client.ping()
        except Exception as exc:
            self.breaker.failed(now, exc)
        else:
            self.breaker.succeeded()

    def state(self) -> dict[str, Any]:
        return {"backend": self.name, "up": not self.breaker.is_down,
                "errors": self.breaker.errors, "written": self.written,
                "writes_dropped": self.writes_dropped, "write_queue": self._writes.qsize(),
                "reads_cut": self.reads_cut}

    def close(self) -> None:
        self._writes.put(None)
        self._writer.join(timeout=2)
        self.client.close()


def redis_client(url: str | None = None, *, timeout_s: float, **kw: Any) -> Any:
    """A redis-py client from a URL, or from ``host``/``port``/... keywords, that never
    retries by itself (the breaker decides when to try again) and waits at most
    ``timeout_s`` per connect and per read."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    opts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 0), "health_check_interval": 0, **kw}
    if url is not None:
        return redis.Redis.from_url(url, **opts)
    return redis.Redis(**opts)


def open_cache(spec: str, *, ttl_s: int, timeout_s: float, memory_items: int) -> Cache:
    """Build the cache a broker config asks for.

    ``off``; ``memory``; a Redis URL (used even while Redis is down: it degrades and comes
    back); or ``auto`` (the default): Redis on 127.0.0.1:6379 if it answers now, else memory.
    """
    if spec == "off":
        return NullCache()
    if spec == "memory":
        return MemoryCache(memory_items, ttl_s)
    if spec == "auto":
        candidate = RedisCache("redis://127.0.0.1:6379/0", ttl_s=ttl_s, timeout_s=timeout_s)
        if candidate.ping():
            return candidate
        candidate.close()
        log.info("no redis on 127.0.0.1:6379: using the in-process memory cache")
        return MemoryCache(memory_items, ttl_s)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisCache(spec, ttl_s=ttl_s, timeout_s=timeout_s)
    if spec.startswith(("redis+cluster://", "rediss+cluster://")):
        from zembed.cache.cluster import RedisClusterCache

        return RedisClusterCache(spec, ttl_s=ttl_s, timeout_s=timeout_s)
    raise ValueError(f"cache must be auto, off, memory, a redis://, rediss://, unix:// URL or "
                     f"redis+cluster://host:port[,host:port...]; got {spec!r}")

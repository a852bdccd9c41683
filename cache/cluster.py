"""Redis Cluster as the cache (``redis+cluster://host:port[,host:port...]``), degrading safely.

Why not redis-py's ``RedisCluster``: its commands retry, re-read the slot map and sleep on the
caller's thread when a node fails, and a pipeline visits the nodes one after the other with no
budget for the whole. The broker loop must never wait past ``cache_timeout_ms`` per turn, and a
failed master must cost misses only. So this backend keeps its own slot map (``CLUSTER SLOTS``,
read by the writer thread, never the loop) and a plain client per node:

- a lookup groups its keys by node and pipelines ``GET``s in chunks of ``CHUNK_KEYS``
  (cluster ``MGET`` takes one slot only); a chunk starts only while the turn's budget can
  still take one more chunk of the slowest size seen, so however many keys arrived the turn
  ends near the budget and the keys it did not reach are misses (``reads_cut``);
- each node has its own breaker: a dead master's keys are misses while the other masters
  keep answering; a ``MOVED``, ``CLUSTERDOWN`` or connection error asks the writer thread to
  read the slot map again, which finds the promoted replica;
- writes go through the writer thread, grouped by node and pipelined like the reads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from zembed.cache.backends import CHUNK_KEYS, PROBE_INTERVAL_S, Breaker, redis_client

log = logging.getLogger("zembed.cache")

SLOTS = 16384
#: The slot map is read again at least this often, even when nothing failed.
REFRESH_S = 10.0
SCHEMES = ("redis+cluster://", "rediss+cluster://")


@dataclass(frozen=True)
class Seeds:
    """What a ``redis+cluster://`` URL says: seed nodes, TLS, credentials."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_url(url: str) -> Seeds:
    """``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://``
    for TLS); ValueError naming what is wrong."""
    if not url.startswith(SCHEMES):
        raise ValueError(f"a cluster cache URL starts with {' or '.join(SCHEMES)}: {url!r}")
    scheme, rest = url.split("://", 1)
    creds, _, hosts = rest.rpartition("@")
    hosts = hosts.split("/", 1)[0]
    nodes = []
    for part in hosts.split(","):
        parsed = urlsplit(f"//{part.strip()}")
        if not parsed.hostname or parsed.port is None:
            raise ValueError(f"cluster cache seed {part!r}: expected host:port")
        nodes.append((parsed.hostname, parsed.port))
    user, _, password = creds.partition(":") if ":" in creds else ("", "", creds)
    return Seeds(tuple(nodes), tls=scheme.startswith("rediss"),
                 username=unquote(user) or None, password=unquote(password) or None)


@dataclass
class Topology:
    """One reading of the slot map: the node of each slot, and a client per node.

    Replaced whole by the writer thread (the loop reads ``owner`` and ``clients`` of whichever
    topology it picked up at the start of a turn)."""

    owner: list[str | None] = field(default_factory=lambda: [None] * SLOTS)
    clients: dict[str, Any] = field(default_factory=dict)  # the loop's, per node
    slots: dict[str, int] = field(default_factory=dict)  # slots per node (stats)


class RedisClusterCache:
    """Redis Cluster: per-node breakers, time-bounded reads, slot map kept off the loop.

    :param url: ``redis+cluster://`` seed nodes.
    :param ttl_s: expiry of each entry (SET ... EX), seconds.
    :param timeout_s: a turn's budget for lookups, and each node read's socket timeout.
    :param write_queue: most pending write batches before new ones are dropped (counted).
    """

    name = "redis-cluster"

    def __init__(self, url: str, *, ttl_s: int, timeout_s: float,
                 write_queue: int = 10_000) -> None:
        self.url = url
        self.seeds = parse_url(url)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.read_failed = False
        self.topology = Topology()
        self.breakers: dict[str, Breaker] = {}
        self.errors = 0  # node failures seen by reads and writes
        self.written = 0
        self.writes_dropped = 0
        self.reads_cut = 0  # keys a turn's budget did not reach (misses)
        self.refreshes = 0
        self.chunk_s = 0.0  # the slowest recent chunk: what one more would cost
        self._stale = threading.Event()
        self._writes: queue.Queue[list[tuple[bytes, bytes]] | None] = queue.Queue(write_queue)
        self._writer_clients: dict[str, Any] = {}
        self.refresh()  # the first map now (bounded by the timeouts); the writer keeps it fresh
        self._writer = threading.Thread(target=self._write_loop, name="zembed-cache-writer",
                                        daemon=True)
        self._writer.start()

    # -- the loop's side -------------------------------------------------------------------

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        self.read_failed = False
        if not keys:
            return out
        topo = self.topology
        start = time.monotonic()
        deadline = start + self.timeout_s
        by_node = self._group(topo, list(enumerate(keys)))
        if None in by_node:
            self.read_failed = True  # slots without a known node: no map yet, or a gap
            self._stale.set()
        work = _interleave({node: _chunks(pairs, CHUNK_KEYS) for node, pairs in by_node.items()
                            if node is not None and node in topo.clients})
        for i, (node, chunk) in enumerate(work):
            now = time.monotonic()
            if i and now + self.chunk_s > deadline:
                self.reads_cut += sum(len(c) for _, c in work[i:])
                break
            breaker = self._breaker(node)
            if not breaker.allow(now):
                self.read_failed = True
                continue
            self._read_chunk(topo.clients[node], breaker, chunk, out, now)
        return out

    def _breaker(self, node: str) -> Breaker:
        """``node``'s breaker, made on first use (not one per chunk, as setdefault would)."""
        breaker = self.breakers.get(node)
        if breaker is None:
            breaker = self.breakers[node] = Breaker(f"redis cluster node {node}")
        return breaker

    def _read_chunk(self, client: Any, breaker: Breaker, chunk: list[tuple[int, bytes]],
                    out: list[bytes | None], now: float) -> None:
        """One chunk of GETs to one node, packed into one write and read back reply by reply
        (redis-py's pipeline objects cost 2-4x as much per key); failures are misses."""
        pool = client.connection_pool
        conn = None
        try:
            conn = pool.get_connection()  # connects if it must: may fail too
            conn.send_packed_command([b"".join(
                b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key) for _, key in chunk)])
            for index, _ in chunk:
                value = conn.read_response()
                if isinstance(value, bytes):
                    out[index] = value
        except Exception as exc:  # refused, timeout, MOVED/CLUSTERDOWN (the map moved), ...
            if conn is not None:
                conn.disconnect()  # replies may be left unread: never reuse this connection
            if isinstance(exc, (OSError, RedisConnectionError, RedisTimeoutError)):
                self.errors += 1  # the node, not the map: its breaker opens
                breaker.failed(time.monotonic(), exc)
            self.read_failed = True
            self._stale.set()
            return
        finally:
            if conn is not None:
                pool.release(conn)
        breaker.succeeded()
        self.chunk_s = max(time.monotonic() - now, self.chunk_s * 0.9)

    def set_many(self, items: list[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        try:
            self._writes.put_nowait(items)
        except queue.Full:
            self.writes_dropped += len(items)

    @staticmethod
    def _group(topo: Topology,
               pairs: list[tuple[int, bytes]]) -> dict[str | None, list[tuple[int, bytes]]]:
        """Keys by the node that serves their slot (None: no node known for it)."""
        from redis.crc import key_slot

        groups: dict[str | None, list[tuple[int, bytes]]] = {}
        owner = topo.owner
        for pair in pairs:
            groups.setdefault(owner[key_slot(pair[1])], []).append(pair)
        return groups

    # -- the writer thread -----------------------------------------------------------------

    def _write_loop(self) -> None:
        last_refresh = time.monotonic()
        while True:
            try:
                items = self._writes.get(timeout=PROBE_INTERVAL_S)
            except queue.Empty:
                items = []
            if items is None:
                return
            now = time.monotonic()
            if self._stale.is_set() or now - last_refresh >= REFRESH_S:
                self.refresh()
                last_refresh = now
            if items:
                self._write(items)
            else:
                self._probe()

    def _write(self, items: list[tuple[bytes, bytes]]) -> None:
        """SET ... EX, grouped by node and pipelined; a failed node drops its share."""
        topo = self.topology
        by_node = self._group(topo, [(i, k) for i, (k, _) in enumerate(items)])
        for node, pairs in by_node.items():
            if node is None:
                continue  # no node known for these slots now: dropped
            client = self._writer_client(node)
            try:
                for chunk in _chunks(pairs, CHUNK_KEYS):
                    pipe = client.pipeline(transaction=False)
                    for index, key in chunk:
                        pipe.set(key, items[index][1], ex=self.ttl_s)
                    results = pipe.execute(raise_on_error=False)
                    self.written += sum(1 for r in results if r is True)
                    if any(isinstance(r, Exception) for r in results):
                        self._stale.set()
            except Exception as exc:
                self.errors += 1
                self._breaker(node).failed(time.monotonic(), exc)
                self._stale.set()

    def _probe(self) -> None:
        """Ping every node whose breaker is open and due, so they close without traffic."""
        now = time.monotonic()
        for node in list(self.topology.clients):
            breaker = self.breakers.get(node)
            if breaker is None or not breaker.is_down or not breaker.allow(now):
                continue
            client = self._writer_client(node)
            try:
                client.ping()
            except Exception as exc:
                breaker.failed(now, exc)
            else:
                breaker.succeeded()

    def refresh(self) -> bool:
        """Read the slot map from a node that answers (known masters first, then the seeds)
        and install it; False when none answered (the old map stays)."""
        self._stale.clear()
        known = [n for n in self.topology.clients if self.topology.slots.get(n)]
        candidates = list(dict.fromkeys([*known, *(f"{h}:{p}" for h, p in self.seeds.nodes)]))
        for node in candidates:
            try:
                owners = slot_owners(self._writer_client(node), node)
            except Exception:
                continue
            topo = Topology()
            for first, last, addr in owners:
                topo.owner[first:last + 1] = [addr] * (last + 1 - first)
                topo.slots[addr] = topo.slots.get(addr, 0) + last + 1 - first
            old = self.topology.clients
            for addr in topo.slots:
                topo.clients[addr] = old.get(addr) or self._client(addr, self.timeout_s)
            if topo.owner != self.topology.owner:
                log.info("redis cluster map: %s", ", ".join(
                    f"{addr} ({n} slots)" for addr, n in sorted(topo.slots.items())))
            self.topology = topo
            self.refreshes += 1
            return True
        self._stale.set()
        return False

    def _writer_client(self, node: str) -> Any:
        client = self._writer_clients.get(node)
        if client is None:
            client = self._writer_clients[node] = self._client(node, max(self.timeout_s, 1.0))
        return client

    def _client(self, node: str, timeout_s: float) -> Any:
        host, port = node.rsplit(":", 1)
        return redis_client(host=host, port=int(port), timeout_s=timeout_s,
                            ssl=self.seeds.tls, username=self.seeds.username,
                            password=self.seeds.password)

    # -- both ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        topo = self.topology
        nodes = [{"node": addr, "slots": n,
                  "up": not (addr in self.breakers and self.breakers[addr].is_down)}
                 for addr, n in sorted(topo.slots.items())]
        return {"backend": self.name, "up": any(n["up"] for n in nodes),
                "errors": self.errors, "written": self.written,
                "writes_dropped": self.writes_dropped, "write_queue": self._writes.qsize(),
                "nodes": nodes, "slots_covered": sum(topo.slots.values()),
                "refreshes": self.refreshes, "reads_cut": self.reads_cut}

    def close(self) -> None:
        self._writes.put(None)
        self._writer.join(timeout=2)
        for clients in (self.topology.clients, self._writer_clients):
            for client in clients.values():
                client.close()


def slot_owners(client: Any, node: str) -> list[tuple[int, int, str]]:
    """``CLUSTER SLOTS`` from ``client`` (reached as ``node``): (first, last, master
    host:port) ranges. A master announced without a host is at ``node``'s host."""
    out = []
    for entry in client.execute_command("CLUSTER SLOTS"):
        first, last, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        out.append((first, last, f"{host or node.rsplit(':', 1)[0]}:{int(master[1])}"))
    return out


def master_clients(url: str, timeout_s: float = 5.0) -> list[Any]:
    """A client for each master of the cluster at ``url`` (for tools that SCAN every
    master: ``zembed cache stats`` and ``purge``); ConnectionError when no seed answers."""
    seeds = parse_url(url)
    errors = []
    for host, port in seeds.nodes:
        opts: dict[str, Any] = {"ssl": seeds.tls, "username": seeds.username,
                                "password": seeds.password}
        try:
            seed = redis_client(host=host, port=port, timeout_s=timeout_s, **opts)
            masters = sorted({addr for _, _, addr in slot_owners(seed, f"{host}:{port}")})
        except Exception as exc:
            errors.append(f"{host}:{port}: {exc}")
            continue
        return [redis_client(host=a.rsplit(":", 1)[0], port=int(a.rsplit(":", 1)[1]),
                             timeout_s=timeout_s, **opts) for a in masters]
    raise ConnectionError("no cluster seed answered: " + "; ".join(errors))


def _chunks(pairs: list[tuple[int, bytes]], size: int) -> list[list[tuple[int, bytes]]]:
    return [pairs[i:i + size] for i in range(0, len(pairs), size)]


def _interleave(chunks: dict[Any, list[list[tuple[int, bytes]]]]
                ) -> list[tuple[Any, list[tuple[int, bytes]]]]:
    """Chunks taken round-robin over the nodes: a turn cut short by its budget shorts every
    node a little, not the last one entirely."""
    out: list[tuple[Any, list[tuple[int, bytes]]]] = []
    for i in range(max((len(c) for c in chunks.values()), default=0)):
        out.extend((node, c[i]) for node, c in chunks.items() if i < len(c))
    return out

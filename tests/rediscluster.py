"""A Redis Cluster of the test's own: masters and replicas on random loopback ports.

Started with ``redis-cli --cluster create`` (what an operator runs), nothing on disk, a short
``cluster-node-timeout`` so that a killed master's replica is promoted within seconds.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer

#: A master silent this long is failed over to its replica (ms).
NODE_TIMEOUT_MS = 1000


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both below 65536."""
    for _ in range(200):
        port = random.randint(20_000, 50_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a redis cluster node")


class RedisCluster:
    """``masters`` masters with ``replicas`` replicas each; ``url`` is the cache's spec."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1,
                 host: str = "127.0.0.1") -> None:
        self.nodes: list[RedisServer] = []
        self.replicas = replicas
        self.host = host
        for _ in range(masters * (1 + replicas)):
            port = cluster_port()
            node_dir = workdir / str(port)
            node_dir.mkdir(parents=True)
            self.nodes.append(RedisServer(port, node_dir, extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS), *self.bind_args())))

    def bind_args(self) -> tuple[str, ...]:
        """Loopback, plus the test's own host address if it has one (a namespaces' bridge:
        then protected mode is off, as nodes and brokers reach it there)."""
        if self.host == "127.0.0.1":
            return ("--bind", "127.0.0.1")
        return ("--bind", "127.0.0.1", self.host, "--protected-mode", "no")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{self.host}:{n.port}" for n in self.nodes[:2])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"{self.host}:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, timeout=60)
        self.wait_ok(30)

    def wait_ok(self, seconds: float) -> None:
        """Until every live node says ``cluster_state:ok`` with all slots served."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if all(self._ok(n) for n in self.nodes if n.popen and n.popen.poll() is None):
                return
            time.sleep(0.1)
        pytest.fail(f"redis cluster not ok within {seconds} s")

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        try:
            info = node.client().execute_command("CLUSTER INFO")
        except Exception:
            return False
        if isinstance(info, dict):  # redis-py parses CLUSTER INFO
            return (str(info.get("cluster_state")) == "ok"
                    and str(info.get("cluster_slots_ok")) == "16384")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and "cluster_slots_ok:16384" in text

    def master_of(self, key: bytes) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        from redis.crc import key_slot

        slot = key_slot(key)
        for node in self.nodes:
            if node.popen is None or node.popen.poll() is not None:
                continue
            try:
                slots: Any = node.client().execute_command("CLUSTER SLOTS")
            except Exception:
                continue
            for first, last, master, *_ in slots:
                if first <= slot <= last:
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise AssertionError("no node serves the slot")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

"""Network namespaces standing in for hosts, for tests and benchmarks of several hosts.

Each host is a namespace with its own loopback and one veth whose other end is on a bridge in
the root namespace; the bridge has the address ``.254`` of a private /24 and stands for one
more host (the test process itself, and anything it binds there, such as a Redis Cluster).
``cut(i)`` takes host ``i``'s link down (its processes keep running, silent, as behind a
dead switch port) and ``mend(i)`` brings it back. Everything is removed by ``close()``; names
carry a random tag so that runs never collide. Needs root (``ip netns``).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=30)


def netns_available() -> bool:
    """Root, iproute2 and a kernel that lets us make namespaces."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"zprobe{secrets.token_hex(3)}"
    try:
        ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError):
        return False
    ip("netns", "del", name, check=False)
    return True


class Hosts:
    """``count`` hosts ``1..count`` on one bridge; ``addr(i)`` is host ``i``'s address."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.bridge = f"zb{self.tag}"
        self.made: list[str] = []

    def ns(self, i: int) -> str:
        return f"zh{self.tag}{i}"

    def veth(self, i: int) -> str:
        return f"zv{self.tag}{i}"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i}"

    @property
    def root_addr(self) -> str:
        """The bridge's address: the root namespace as one more host."""
        return f"{self.subnet}.254"

    def start(self) -> Hosts:
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self.made.append("bridge")
            ip("addr", "add", f"{self.root_addr}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for i in range(1, self.count + 1):
                ns, veth = self.ns(i), self.veth(i)
                ip("netns", "add", ns)
                self.made.append(ns)
                ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("link", "set", veth, "master", self.bridge)
                ip("link", "set", veth, "up")
                ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``i`` (``ip netns exec`` execs it: same pid, signals work)."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def zembed(self, i: int, args: Sequence[str]) -> list[str]:
        return self.command(i, [sys.executable, "-m", "zembed", *args])

    def cut(self, i: int) -> None:
        """Host ``i`` off the network: its link goes down, nothing is closed."""
        ip("link", "set", self.veth(i), "down")

    def mend(self, i: int) -> None:
        ip("link", "set", self.veth(i), "up")

    def close(self) -> None:
        for name in reversed(self.made):
            if name == "bridge":
                ip("link", "del", self.bridge, check=False)
            else:
                ip("netns", "del", name, check=False)  # its veth goes with it
        self.made = []

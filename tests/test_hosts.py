"""Several hosts (issue 16): network namespaces with addresses of their own stand in for hosts.

Three hosts, each with a broker and a MiniLM text engine that serves all three brokers; a Redis
Cluster of 3 masters and 3 replicas on the bridge (the root namespace, also the client's host).
Under a steady load one host is cut off and another's broker killed: every call is answered,
and once they are back the load spreads over all three again. And two engines of one lane on
two hosts behind one broker share its load by their credits.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Proc, wait_until
from hosts import Hosts, netns_available
from rediscluster import RedisCluster

from zembed.client import AsyncClient, Client

pytestmark = pytest.mark.slow

#: Engine options of the other tests' stacks (conftest), heartbeats 200 ms.
ENGINE_ARGS = ["--threads", "1", "--credits", "64", "--max-batch", "32",
               "--max-batch-tokens", "8192", "--heartbeat-interval-ms", "200"]


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if not netns_available():
        pytest.skip("needs root and ip netns (network namespaces stand in for hosts)")
    h = Hosts(3).start()
    try:
        yield h
    finally:
        h.close()


class Site:
    """Brokers and engines started inside the hosts; stopped at the end."""

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        self.procs: list[Proc] = []

    def front(self, i: int) -> str:
        return f"tcp://{self.hosts.addr(i)}:5555"

    def back(self, i: int) -> str:
        return f"tcp://{self.hosts.addr(i)}:5556"

    def start(self, i: int, name: str, args: list[str]) -> Proc:
        proc = Proc(name, subprocess.Popen(self.hosts.zembed(i, args)))
        self.procs.append(proc)
        return proc

    def broker(self, i: int, *args: str) -> Proc:
        return self.start(i, f"broker{i}", [
            "start", "broker", "--frontend", self.front(i), "--backend", self.back(i),
            "--stats-endpoint", f"tcp://{self.hosts.addr(i)}:5557", "--lanes", "text", *args])

    def engine(self, i: int, brokers: list[int], *args: str) -> Proc:
        return self.start(i, f"text{i}", ["start", "text", "--broker",
                                          ",".join(self.back(b) for b in brokers),
                                          *ENGINE_ARGS, *args])

    def engines_at(self, i: int) -> list[dict[str, object]]:
        with Client(self.front(i), timeout=2, retries=0) as c:
            return list(c.stats(timeout=2)["lanes"]["text"]["engines"])

    def served(self, i: int) -> int:
        with Client(self.front(i), timeout=5, retries=0) as c:
            return int(c.stats(timeout=5)["lanes"]["text"]["requests"]["200"])

    def wait_engines(self, i: int, count: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.popen.poll() not in (None, -signal.SIGKILL):
                    pytest.fail(f"{proc.name} exited with {proc.popen.returncode}")
            try:
                if len([e for e in self.engines_at(i) if e["alive"]]) >= count:
                    return
            except Exception:
                pass
            time.sleep(0.2)
        pytest.fail(f"broker {i}: {count} live engine(s) not within {seconds} s")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


async def steady_load(endpoints: list[str], seconds: float, tag: str, workers: int = 4,
                      texts: int = 2) -> tuple[int, int]:
    """``workers`` callers, each one call of ``texts`` texts after another for ``seconds``:
    (calls answered, requests the client resubmitted). Any failed call raises."""
    answered = 0
    async with AsyncClient(endpoints, timeout=30) as client:
        t_end = time.monotonic() + seconds

        async def worker(w: int) -> None:
            nonlocal answered
            k = 0
            while time.monotonic() < t_end:  # bounded by time
                vectors = await client.embed_texts([f"{tag} {w} {k} {j}" for j in range(texts)])
                assert vectors.shape == (texts, 384)
                answered += 1
                k += 1

        await asyncio.gather(*(worker(w) for w in range(workers)))
        return answered, client.resubmitted


@pytest.mark.timeout(420)
def test_three_hosts_lose_one_host_and_one_broker_and_every_call_is_answered(
        hosts: Hosts, tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path / "redis", host=hosts.root_addr)
    site = Site(hosts)
    try:
        cluster.start()
        for i in (1, 2, 3):
            site.broker(i, "--cache", cluster.url)
        for i in (1, 2, 3):
            site.engine(i, [1, 2, 3])
        for i in (1, 2, 3):
            site.wait_engines(i, 3, 150)
        fronts = [site.front(i) for i in (1, 2, 3)]
        before = [site.served(i) for i in (1, 2, 3)]
        calls, _ = asyncio.run(steady_load(fronts, 3, "warm"))
        assert calls > 0 and all(site.served(i) > before[i - 1] for i in (1, 2, 3))

        async def through_failures() -> tuple[int, int]:
            load = asyncio.ensure_future(steady_load(fronts, 12, "failing", workers=6))
            await asyncio.sleep(1.5)
            hosts.cut(3)  # host 3 silent: its broker and engine unreachable
            broker2 = next(p for p in site.procs if p.name == "broker2")
            broker2.signal(signal.SIGKILL)  # host 2's broker dies; its engine lives on
            return await load

        calls, resubmitted = asyncio.run(through_failures())
        assert calls > 0 and resubmitted >= 1  # in flight on 2 or 3: sent again to 1
        # Broker 1 now has every credit of the engines it still hears (1 and 2).
        alive = [e for e in site.engines_at(1) if e["alive"]]
        assert len(alive) == 2 and all(e["credits_total"] == 64 for e in alive)

        hosts.mend(3)
        site.broker(2, "--cache", cluster.url)
        for i in (1, 2, 3):
            site.wait_engines(i, 3, 60)
        before = [site.served(i) for i in (1, 2, 3)]
        calls, _ = asyncio.run(steady_load(fronts, 4, "mended"))
        after = [site.served(i) for i in (1, 2, 3)]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

        def even() -> bool:  # 64 credits split over 3 brokers again, once all are heard
            engines = site.engines_at(1)
            return len(engines) == 3 and all(e["credits_total"] in (21, 22) for e in engines)

        wait_until(even, 30)
    finally:
        site.stop()
        cluster.stop()


@pytest.mark.timeout(300)
def test_two_engines_on_two_hosts_behind_one_broker_share_by_credits(hosts: Hosts) -> None:
    site = Site(hosts)
    try:
        site.broker(1, "--cache", "off")
        site.engine(1, [1], "--credits", "48")
        site.engine(2, [1], "--credits", "16")
        site.wait_engines(1, 2, 150)
        # 8 callers x 8 texts: up to 64 items in flight, all the two engines' credits.
        asyncio.run(steady_load([site.front(1)], 6, "split", workers=8, texts=8))
        engines = {e["credits_total"]: e for e in site.engines_at(1)}
        assert set(engines) == {48, 16}
        big, small = engines[48]["items_done"], engines[16]["items_done"]
        assert isinstance(big, int) and isinstance(small, int)
        # Each request goes to the engine with the most free credits: both work, and the one
        # with three times the credits takes the larger share.
        assert small > 0 and big > small, (big, small)
    finally:
        site.stop()

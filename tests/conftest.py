"""Fixtures that run real zembed processes on random loopback ports and always clean up.

Every process is a real ``python -m zembed start ...`` child; every wait is bounded, so a
broken build fails a test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from zembed.client import Client
from zembed.tools.net import free_port

# Tests never reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

#: Short heartbeats so liveness tests finish fast: dead after 3 x 200 ms.
HEARTBEAT_MS = 200
ENGINE_START_S = 90.0


def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``cond`` until it holds, or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"condition not met within {timeout}s")


def scrape_metrics(port: int, timeout: float = 30.0) -> str:
    """``/metrics`` of an exporter on 127.0.0.1:``port``, once it reports ``zembed_up 1``."""
    import urllib.request

    text = ""

    def scraped() -> bool:
        nonlocal text
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return False
        return "zembed_up 1.0" in text

    wait_until(scraped, timeout)
    return text


def hit_when_written(call: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Repeat ``call`` until every item comes from the cache (writes land after the reply)."""
    deadline = time.monotonic() + timeout
    while True:
        result = call()
        if result.cached == len(result.vectors) or time.monotonic() > deadline:
            assert result.cached == len(result.vectors), "write-back never landed"
            return result
        time.sleep(0.02)


@dataclass
class Proc:
    """A child process we started; ``stop`` is idempotent."""

    name: str
    popen: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@dataclass
class Stack:
    """A broker and its engines on private ports."""

    frontend: str
    backend: str
    stats: str = ""  # the broker's stats PUB endpoint
    procs: list[Proc] = field(default_factory=list)
    broker: Proc | None = None
    engine: Proc | None = None  # the engine a test singles out, where it needs one

    def start_broker(self, *args: str) -> Proc:
        """A broker serving the text lane only, without a cache, unless ``args`` say otherwise.

        (Without a cache every request reaches an engine, which is what most tests are about;
        the cache tests give their own ``--cache``.)
        """
        proc = spawn("broker", ["start", "broker", "--frontend", self.frontend,
                                "--backend", self.backend, "--lanes", "text", "--cache", "off",
                                "--heartbeat-interval-ms", str(HEARTBEAT_MS),
                                "--stats-endpoint", self.stats, *args])
        self.broker = proc
        self.procs.append(proc)
        return proc

    def start_text(self, *args: str) -> Proc:
        proc = spawn("text", ["start", "text", "--broker", self.backend,
                              "--heartbeat-interval-ms", str(HEARTBEAT_MS), "--threads", "1",
                              # the sizes tests were written for; a later flag wins (click)
                              "--credits", "64", "--max-batch", "32",
                              "--max-batch-tokens", "8192", *args])
        self.procs.append(proc)
        return proc

    def start_image(self, *args: str) -> Proc:
        """An image engine (one torch thread) for this stack's backend."""
        proc = spawn("image", ["start", "image", "--broker", self.backend, "--threads", "1",
                               "--credits", "16", "--max-batch", "16", *args])
        self.procs.append(proc)
        return proc

    def client(self, **kw: Any) -> Client:
        """A client that raises 429/503 at once (tests look at each answer) unless told."""
        kw.setdefault("timeout", 10.0)
        kw.setdefault("retries", 0)
        return Client(self.frontend, **kw)

    def wait_engines(self, lane: str, count: int, timeout: float = ENGINE_START_S) -> None:
        """Wait until ``count`` engines serve ``lane`` (fails fast if a child died)."""
        deadline = time.monotonic() + timeout
        with self.client(timeout=1.0) as c:
            while time.monotonic() < deadline:
                for proc in self.procs:
                    code = proc.popen.poll()
                    if code is not None and code > 0:  # negative: killed on purpose by a test
                        pytest.fail(f"{proc.name} exited with {proc.popen.returncode}")
                try:
                    engines = c.stats(timeout=0.5)["lanes"][lane]["engines"]
                    if len(engines) >= count:
                        return
                except Exception:
                    pass
                time.sleep(0.05)
        pytest.fail(f"{count} engine(s) for lane {lane} not registered within {timeout}s")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def spawn(name: str, args: list[str]) -> Proc:
    """Start ``python -m zembed <args>`` with output passed through (visible on failure)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    popen = subprocess.Popen([sys.executable, "-m", "zembed", *args], env=env)
    return Proc(name, popen)


def new_stack() -> Stack:
    return Stack(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}",
                 f"tcp://127.0.0.1:{free_port()}")


@pytest.fixture
def stack_factory() -> Iterator[Callable[[], Stack]]:
    """Per-test stacks (for tests that kill or stop processes)."""
    stacks: list[Stack] = []

    def make() -> Stack:
        stacks.append(new_stack())
        return stacks[-1]

    yield make
    for s in stacks:
        s.close()


@pytest.fixture(scope="session")
def shared_stack() -> Iterator[Stack]:
    """One broker + one text engine shared by the tests that do not disturb them."""
    stack = new_stack()
    try:
        stack.start_broker()
        stack.start_text()
        stack.wait_engines("text", 1)
        yield stack
    finally:
        stack.close()


@pytest.fixture
def client(shared_stack: Stack) -> Iterator[Client]:
    with shared_stack.client() as c:
        yield c


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def raw(shared_stack: Stack, zctx: zmq.Context[Any]) -> Iterator[zmq.Socket[Any]]:
    """A bare DEALER on the shared stack's frontend, for hand-made (or hostile) frames."""
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(shared_stack.frontend)
    yield sock
    sock.close()


def recv(sock: zmq.Socket[Any], timeout: float = 5.0) -> list[bytes]:
    """Receive a multipart message or fail the test after ``timeout`` seconds."""
    if not sock.poll(int(timeout * 1000)):
        pytest.fail(f"nothing received within {timeout}s")
    return sock.recv_multipart()


# -- a tiny open_clip model, made by the tests --------------------------------------------

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                       "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                     "layers": 2}}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model config file, checkpoint file) of a tiny open_clip CLIP with fixed weights."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("tiny-clip")
    config = folder / "zembed-tiny.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(1234)
    model = open_clip.create_model("zembed-tiny")
    weights = folder / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


def tiny_args(tiny: tuple[Path, Path]) -> list[str]:
    return ["--model", "zembed-tiny", "--model-config", str(tiny[0]), "--pretrained",
            str(tiny[1])]


@contextmanager
def both_lanes(tiny: tuple[Path, Path], *broker_args: str) -> Iterator[Stack]:
    """Broker serving both lanes, one text engine, one tiny image engine (16 credits, batches
    of 4, fp32; it is ``stack.engine``).

    Default 1 s heartbeats: the saturation tests oversubscribe the 2 cores on purpose, and
    liveness is tested elsewhere.
    """
    stack = new_stack()
    try:
        stack.start_broker("--lanes", "text,image", "--heartbeat-interval-ms", "1000",
                           *broker_args)
        stack.start_text("--heartbeat-interval-ms", "1000")
        stack.engine = stack.start_image("--heartbeat-interval-ms", "1000", "--credits", "16",
                                         "--max-batch", "4", "--dtype", "fp32", *tiny_args(tiny))
        stack.wait_engines("text", 1)
        stack.wait_engines("image", 1)
        yield stack
    finally:
        stack.close()


# -- a Redis of the test's own, on a random port ---------------------------------------------


@dataclass
class RedisServer:
    """A throwaway redis-server (nothing on disk) that tests may kill and restart."""

    port: int
    workdir: Path
    popen: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()  # more redis-server options (cluster mode, for one)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.popen = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()

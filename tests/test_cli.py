"""The zembed command: `up` (with the demo, and a clean Ctrl-C), `embed`, probes, `config`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Stack, free_port

from zembed.client import Client
from zembed.errors import ZembedError

ZEMBED = [sys.executable, "-m", "zembed"]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    fe, be, st = free_port(), free_port(), free_port()
    path = tmp_path / "zembed.toml"
    path.write_text(
        f'[broker]\nfrontend = "tcp://127.0.0.1:{fe}"\nbackend = "tcp://127.0.0.1:{be}"\n'
        f'stats_endpoint = "tcp://127.0.0.1:{st}"\nlanes = ["text"]\ncache = "off"\n'
        f'[text]\nbroker = "tcp://127.0.0.1:{be}"\nthreads = 1\n'
        f'[client]\nendpoint = "tcp://127.0.0.1:{fe}"\n')
    return path


def test_up_demo_runs_and_exits(config_file: Path) -> None:
    port = free_port()
    with config_file.open("a") as fh:
        fh.write(f'[gateway]\nlisten = "127.0.0.1:{port}"\n')
    out = subprocess.run([*ZEMBED, "up", "--demo", "--gateway", "--config", str(config_file)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "zembed is ready in" in out.stdout
    assert "shape (5, 384)" in out.stdout
    assert "nearest to #0: #1" in out.stdout  # the two password sentences find each other
    assert (f"http: POST http://127.0.0.1:{port}/v1/embeddings (OpenAI API) answered 5 vectors "
            "of 384; identical to the SDK's") in out.stdout


def test_up_stops_everything_on_ctrl_c(config_file: Path) -> None:
    # Its own session, so cleanup can kill the supervisor and its children together.
    up = subprocess.Popen([*ZEMBED, "up", "--config", str(config_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
    try:
        endpoint = f"tcp://127.0.0.1:{config_file.read_text().split(':')[2].split(chr(34))[0]}"
        deadline = time.monotonic() + 120

        def ready(c: Client) -> bool:
            try:
                return bool(c.ready(timeout=1).get("ready"))
            except ZembedError:  # the broker is not listening yet
                return False

        with Client(endpoint, timeout=1) as c:
            while not ready(c):
                assert time.monotonic() < deadline and up.poll() is None
                time.sleep(0.1)
            assert c.embed_texts(["up and serving"]).shape == (1, 384)
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=30)
        assert up.returncode == 0, err[-2000:]
        # Children are gone: the frontend port can be bound again at once.
        with Client(endpoint, timeout=0.5) as c, pytest.raises(Exception):  # noqa: B017
            c.ping()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.communicate(timeout=30)


def test_embed_text_json(shared_stack: Stack) -> None:
    out = subprocess.run([*ZEMBED, "embed", "text", "hello world", "second text", "--json",
                          "--endpoint", shared_stack.frontend], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["input"] for r in rows] == ["hello world", "second text"]
    assert all(r["dim"] == 384 and len(r["vector"]) == 384 for r in rows)


def test_embed_text_error_is_clean(shared_stack: Stack) -> None:
    out = subprocess.run([*ZEMBED, "embed", "text", "x" * 70_000, "--endpoint",
                          shared_stack.frontend], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "TooLarge (413)" in out.stderr


def test_probes_succeed_on_a_ready_stack(shared_stack: Stack) -> None:
    for op in (["ping"], ["health"], ["ready"],
               ["stats", "--once", "--json", "--stats-endpoint", shared_stack.stats]):
        out = subprocess.run([*ZEMBED, *op, "--endpoint", shared_stack.frontend],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (op, out.stderr)
        assert isinstance(json.loads(out.stdout), dict)


def test_config_show_applies_environment(config_file: Path) -> None:
    out = subprocess.run([*ZEMBED, "config", "show", "text", "--config", str(config_file)],
                         capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "ZEMBED_TEXT_CREDITS": "42"})
    assert out.returncode == 0
    assert "credits = 42" in out.stdout and "threads = 1" in out.stdout

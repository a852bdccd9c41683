"""The HTTP gateway against a real broker, real engines and the reference clients.

The official ``openai`` package and ``huggingface_hub``'s InferenceClient talk to a
``zembed gateway`` process; their vectors must be exactly the SDK's for the same inputs. Then
the errors: 429 with Retry-After under a lane held short of credits (a frozen engine), 503 at
once with the broker gone, 400/413 for bad bodies, 401 without a key; and /health, /ready,
/metrics. Every HTTP call has a timeout.
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from conftest import Proc, Stack, both_lanes, new_stack, spawn
from images import data_uri, png

from zembed.client import Client
from zembed.tools.net import free_port

HTTP_TIMEOUT_S = 30.0


@dataclass
class Gateway:
    """A ``zembed gateway`` process on a private port."""

    port: int
    proc: Proc

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body: Any = None, *,
             headers: dict[str, str] | None = None,
             timeout: float = HTTP_TIMEOUT_S) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body); ``body`` a dict is sent as JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            conn.request(method, path, body=data, headers={
                "content-type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, dict[str, str], Any]:
        status, headers, raw = self.call("POST", path, body, **kw)
        return status, headers, json.loads(raw) if raw else None

    def stop(self) -> None:
        self.proc.stop()


def start_gateway(stack: Stack, *args: str, ready: bool = True) -> Gateway:
    """A gateway for ``stack``'s broker; waits until it answers (and ``/ready`` says 200)."""
    port = free_port()
    gw = Gateway(port, spawn("gateway", ["gateway", "--broker", stack.frontend, "--listen",
                                         f"127.0.0.1:{port}", *args]))
    stack.procs.append(gw.proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not gw.proc.alive():
            pytest.fail(f"gateway exited with {gw.proc.popen.returncode}")
        try:
            status, _, _ = gw.call("GET", "/ready" if ready else "/health", timeout=2)
            if status == 200 or not ready:
                return gw
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail("gateway not answering within 60 s")


@pytest.fixture(scope="module")
def lanes(tiny: tuple[Path, Path]) -> Iterator[Stack]:
    """Text (MiniLM) and image (tiny CLIP) lanes behind one broker with a memory cache."""
    with both_lanes(tiny, "--cache", "memory") as stack:
        yield stack


@pytest.fixture(scope="module")
def gw(lanes: Stack) -> Gateway:
    return start_gateway(lanes, "--model-aliases", "text-embedding-3-small=text",
                         "--max-body-bytes", "2000000")


@pytest.fixture(scope="module")
def sdk(lanes: Stack) -> Iterator[Client]:
    with lanes.client(timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def api(gw: Gateway) -> Iterator[Any]:
    """The official openai client on the gateway, closed at the end (its connection pool's
    sockets would otherwise be left to the garbage collector: a ResourceWarning)."""
    with openai.OpenAI(base_url=f"{gw.base}/v1", api_key="not-needed", max_retries=0,
                       timeout=HTTP_TIMEOUT_S) as client:
        yield client


def floats(data: list[Any]) -> np.ndarray:
    return np.array([d.embedding for d in data], dtype=np.float32)


TEXTS = ["red running shoes", "a blue winter hat", "shoes for running in the rain"]


# -- OpenAI ----------------------------------------------------------------------------------

def test_openai_package_float_and_base64_equal_the_sdk(api: Any, sdk: Client) -> None:
    client = api
    want = sdk.embed_texts(TEXTS)
    listed = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS,
                                      encoding_format="float")
    assert [d.index for d in listed.data] == [0, 1, 2]
    assert np.array_equal(floats(listed.data), want)
    assert listed.model == "all-MiniLM-L6-v2" and listed.object == "list"
    single = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[1],
                                      encoding_format="float")
    assert len(single.data) == 1 and np.array_equal(floats(single.data)[0], want[1])
    b64 = client.embeddings.create(model="text", input=TEXTS, encoding_format="base64")
    rows = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b64.data]
    assert np.array_equal(np.stack(rows), want)
    # Left to itself the package asks for base64 and decodes it: the same vectors.
    default = client.embeddings.create(model="text-embedding-3-small", input=TEXTS[0])
    assert np.array_equal(floats(default.data)[0], want[0])


def test_openai_response_is_the_exact_shape(gw: Gateway) -> None:
    status, headers, body = gw.post("/v1/embeddings", {"model": "text", "input": ["x", "y"],
                                                       "user": "someone"})
    assert status == 200 and headers["content-type"] == "application/json"
    assert list(body) == ["object", "data", "model", "usage"]
    assert body["object"] == "list" and body["model"] == "text"
    assert [list(d) for d in body["data"]] == [["object", "index", "embedding"]] * 2
    assert [d["object"] for d in body["data"]] == ["embedding", "embedding"]
    assert all(len(d["embedding"]) == 384 and isinstance(d["embedding"][0], float)
               for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    status, _, same = gw.post("/embeddings", {"model": "text", "input": ["x", "y"]})
    assert status == 200 and same["data"] == body["data"]


def test_models_lists_what_is_served_and_unknown_is_404(api: Any) -> None:
    models = api.models.list()
    ids = {m.id for m in models.data}
    assert {"sentence-transformers/all-MiniLM-L6-v2", "zembed-tiny",
            "text-embedding-3-small"} <= ids
    one = api.models.retrieve("all-MiniLM-L6-v2")
    assert (one.id, one.object, one.owned_by) == ("all-MiniLM-L6-v2", "model", "zembed")
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError) as info:
        api.embeddings.create(model="no-such-model", input="x")
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found"
    assert "all-MiniLM-L6-v2" in info.value.body["message"]


def test_large_request_is_split_and_answered_in_order(gw: Gateway, api: Any,
                                                       sdk: Client) -> None:
    texts = [f"catalogue item number {i}, a {'red' if i % 2 else 'green'} thing"
             for i in range(500)]  # ~8 broker requests of 64 (the lane's credits)
    got = api.embeddings.create(model="text", input=texts, encoding_format="float")
    assert [d.index for d in got.data] == list(range(500))
    assert np.array_equal(floats(got.data), sdk.embed_many(texts))
    status, _, body = gw.post("/v1/embeddings", {"model": "text", "input": ["x"] * 2049})
    assert status == 413 and body["error"]["code"] == "too_many_inputs"


def test_dimensions_are_the_brokers_rule(gw: Gateway) -> None:
    status, _, body = gw.post("/v1/embeddings", {"model": "text", "input": "x",
                                                 "dimensions": 384})
    assert status == 200 and len(body["data"][0]["embedding"]) == 384
    status, _, body = gw.post("/v1/embeddings", {"model": "text", "input": "x",
                                                 "dimensions": 64})
    assert status == 400 and "does not allow dimensions" in body["error"]["message"]
    status, _, body = gw.post("/v1/embeddings", {"model": "text", "input": "x",
                                                 "dimensions": "64"})
    assert status == 400 and body["error"]["param"] == "dimensions"


def test_images_and_clip_text_through_one_endpoint(gw: Gateway, api: Any,
                                                    sdk: Client) -> None:
    images = [png(1), png(2)]
    want = sdk.embed_images(images).vectors
    status, _, body = gw.post("/v1/embeddings", {
        "model": "zembed-tiny", "modality": "image",
        "input": [data_uri(images[0]), base64.b64encode(images[1]).decode()]})
    assert status == 200, body
    assert np.array_equal(np.array([d["embedding"] for d in body["data"]], np.float32), want)
    text = api.embeddings.create(model="zembed-tiny", input=["a photo of a cat"],
                                     encoding_format="float")
    assert np.array_equal(floats(text.data), sdk.embed_clip_texts(["a photo of a cat"]))
    status, _, body = gw.post("/v1/embeddings", {
        "model": "image", "modality": "image",
        "input": [data_uri(images[0]), data_uri(b"not a picture at all")]})
    assert status == 400 and body["error"]["message"].startswith("input[1]: ")
    status, _, body = gw.post("/v1/embeddings", {"model": "image", "modality": "image",
                                                 "input": ["%%% not base64"]})
    assert status == 400 and "input[0]" in body["error"]["message"]
    status, _, body = gw.post("/v1/embeddings", {"model": "text", "modality": "image",
                                                 "input": [data_uri(images[0])]})
    assert status == 400 and body["error"]["param"] == "modality"


def test_input_type_selects_the_prompt(gw: Gateway, sdk: Client) -> None:
    status, _, body = gw.post("/v1/embeddings", {"model": "text", "input": ["x"],
                                                 "input_type": "query"})
    assert status == 200
    assert np.array_equal(np.array(body["data"][0]["embedding"], np.float32),
                          sdk.embed_texts(["x"], input_type="query")[0])
    status, _, body = gw.post("/v1/embeddings", {"model": "text", "input": ["x"],
                                                 "input_type": "no_such_prompt"})
    assert status == 400 and "unknown prompt" in body["error"]["message"]


# -- TEI -------------------------------------------------------------------------------------

def test_huggingface_hub_feature_extraction(gw: Gateway, sdk: Client,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub as hub

    # HF_HUB_OFFLINE=1 (set for the whole suite: no model hub at run time) also blocks
    # InferenceClient's calls to the gateway on 127.0.0.1; lift it for this client only.
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    client = hub.InferenceClient(base_url=gw.base, timeout=HTTP_TIMEOUT_S)
    got = client.feature_extraction(TEXTS[0])
    assert np.array_equal(np.asarray(got, np.float32).reshape(1, -1), sdk.embed_texts(TEXTS[:1]))
    status, _, body = gw.post("/embed", {"inputs": TEXTS, "normalize": False, "truncate": True})
    assert status == 200 and isinstance(body, list) and len(body) == 3
    assert np.array_equal(np.array(body, np.float32), sdk.embed_texts(TEXTS, normalize=False))
    status, _, body = gw.post("/embed", {"inputs": "one", "prompt_name": "query"})
    assert status == 200 and np.array(body).shape == (1, 384)
    status, _, body = gw.post("/embed", {"inputs": 5})
    assert status == 400 and set(body) == {"error", "error_type"}
    assert body["error_type"] == "Validation"


# -- bad requests ----------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_request"),
    (b'{"model": "text"}', "invalid_request"),
    (b'{"input": 5}', "invalid_request"),
    (b'{"input": []}', "invalid_request"),
    (b'{"input": [[1, 2, 3]]}', "token_ids_not_supported"),
    (b'{"input": ["a", 7]}', "invalid_request"),
    (b'{"input": "a", "encoding_format": "int8"}', "invalid_request"),
    (b'{"input": "a", "dimensions": true}', "invalid_request"),
    (b'{"input": "a", "model": 5}', "invalid_request"),
])
def test_bad_bodies_are_400(gw: Gateway, body: bytes, code: str) -> None:
    status, _, raw = gw.call("POST", "/v1/embeddings", body)
    error = json.loads(raw)["error"]
    assert status == 400 and error["code"] == code and error["type"] == "invalid_request_error"
    assert error["message"]


def test_oversized_body_is_413_before_it_is_read(gw: Gateway) -> None:
    """Content-Length over the limit: answered from the headers alone."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: "
                     b"application/json\r\ncontent-length: 50000000\r\n\r\n{\"input\": \"")
        t0 = time.perf_counter()
        head = sock.recv(65536)
        took = time.perf_counter() - t0
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert took < 2.0
    # Without a Content-Length (chunked), the limit stops the read part way.
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b'"' + b"x" * 100_000 + b'",'
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.request("POST", "/v1/embeddings", body=chunks(), encode_chunked=True,
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    except (BrokenPipeError, ConnectionResetError):
        pass  # the gateway answered and closed while the client was still sending: also fine
    finally:
        conn.close()
    status, _, _ = gw.call("GET", "/health")
    assert status == 200  # still serving


def test_unknown_route_and_wrong_method(gw: Gateway) -> None:
    status, _, raw = gw.call("GET", "/v2/nothing")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, headers, _ = gw.call("GET", "/v1/embeddings")
    assert status == 405 and headers["allow"] == "POST"


# -- probes and metrics ------------------------------------------------------------------------

def test_health_ready_and_metrics(gw: Gateway) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, raw = gw.call("GET", "/health")
    body = json.loads(raw)
    assert status == 200 and body["status"] == "ok" and "turns" in body["broker_loop"]
    status, _, raw = gw.call("GET", "/ready")
    assert status == 200 and json.loads(raw) == {"ready": True, "missing": [], "reasons": []}
    gw.post("/v1/embeddings", {"model": "text", "input": ["metered"]})
    gw.call("GET", "/v2/nothing")
    status, headers, raw = gw.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    requests = {(s.labels["route"], s.labels["status"]): s.value
                for s in families["zembed_gateway_requests"].samples}
    assert requests[("/v1/embeddings", "200")] >= 1 and requests[("other", "404")] >= 1
    hist = [s for s in families["zembed_gateway_request_duration_seconds"].samples
            if s.name.endswith("_count") and s.labels["route"] == "/v1/embeddings"]
    assert hist and hist[0].value >= 1
    in_flight = families["zembed_gateway_in_flight"].samples[0].value
    assert in_flight == 1  # this very scrape
    assert families["zembed_gateway_broker_connections"].samples[0].value == 1
    assert families["zembed_gateway_workers"].samples[0].value == 1


# -- overload, broker gone, keys -------------------------------------------------------------

def test_lane_out_of_credits_is_429_with_retry_after() -> None:
    stack = new_stack()
    try:
        stack.start_broker("--heartbeat-interval-ms", "1000")
        engine = stack.start_text("--credits", "4", "--max-batch", "4",
                                  "--heartbeat-interval-ms", "1000")
        stack.wait_engines("text", 1)
        gw = start_gateway(stack)
        with stack.client() as c:
            engine.signal(signal.SIGSTOP)
            try:
                held = c.submit("text", "text", ["a", "b", "c", "d"])  # all 4 credits
                time.sleep(0.05)
                t0 = time.perf_counter()
                status, headers, body = gw.post("/v1/embeddings", {"input": "one too many"})
                took_ms = (time.perf_counter() - t0) * 1000
                big = gw.post("/v1/embeddings", {"input": [f"t{i}" for i in range(10)]})
            finally:
                engine.signal(signal.SIGCONT)
            assert c.result(held).vectors.shape == (4, 384)
        print(f"time to 429 through the gateway: {took_ms:.2f} ms")
        assert status == 429 and body["error"]["type"] == "rate_limit_exceeded"
        ms = int(headers["retry-after-ms"])
        assert ms > 0 and int(headers["retry-after"]) == max(1, -(-ms // 1000))
        # A request split in parts is refused whole while none of it can get in.
        assert big[0] == 429 and "retry-after" in big[1]
        # The openai package honours Retry-After and gets through once there is room.
        with openai.OpenAI(base_url=f"{gw.base}/v1", api_key="x", max_retries=3,
                           timeout=HTTP_TIMEOUT_S) as retrying:
            got = retrying.embeddings.create(model="text", input="ok")
        assert len(got.data[0].embedding) == 384
    finally:
        stack.close()


def test_broker_gone_is_503_at_once_and_probes_say_why() -> None:
    stack = new_stack()
    try:
        stack.start_broker()
        stack.start_text()
        stack.wait_engines("text", 1)
        gw = start_gateway(stack)
        assert gw.post("/v1/embeddings", {"input": "warm"})[0] == 200
        assert stack.broker is not None
        stack.broker.stop()
        time.sleep(0.5)  # the kernel closes the connection; the gateway sees it drop
        t0 = time.perf_counter()
        status, headers, body = gw.post("/v1/embeddings", {"input": "anyone?"})
        took = time.perf_counter() - t0
        assert status == 503 and took < 1.0, (status, took)
        assert body["error"]["code"] == "broker_unreachable" and "retry-after" in headers
        status, _, raw = gw.call("GET", "/health", timeout=10)
        assert status == 503 and json.loads(raw)["status"] == "unavailable"
        status, _, raw = gw.call("GET", "/ready", timeout=10)
        assert status == 503 and json.loads(raw)["missing"] == ["broker"]
        status, _, _ = gw.call("POST", "/embed", b'{"inputs": "x"}')
        assert status == 503
        # The broker comes back on the same port: the gateway serves again by itself.
        stack.start_broker()
        deadline = time.monotonic() + 60
        while gw.post("/v1/embeddings", {"input": "back"})[0] != 200:
            assert time.monotonic() < deadline, "gateway did not serve again after 60 s"
            time.sleep(0.2)
    finally:
        stack.close()


def test_api_keys_from_a_file_reloaded_without_restart(lanes: Stack, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team a\nkey-one\n\n")
    gw = start_gateway(lanes, "--api-keys-file", str(keys))
    try:
        assert gw.post("/v1/embeddings", {"input": "x"})[0] == 401
        status, headers, body = gw.post("/v1/embeddings", {"input": "x"},
                                        headers={"authorization": "Bearer wrong"})
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert body["error"]["type"] == "authentication_error"
        with openai.OpenAI(base_url=f"{gw.base}/v1", api_key="key-one", max_retries=0) as ok:
            assert len(ok.embeddings.create(model="text", input="x").data) == 1
        assert gw.call("GET", "/health")[0] == 200  # probes need no key
        keys.write_text("key-two\n")
        deadline = time.monotonic() + 10
        while gw.post("/v1/embeddings", {"input": "x"},
                      headers={"authorization": "Bearer key-two"})[0] != 200:
            assert time.monotonic() < deadline, "new key not taken within 10 s"
            time.sleep(0.2)
        assert gw.post("/v1/embeddings", {"input": "x"},
                       headers={"authorization": "Bearer key-one"})[0] == 401
    finally:
        gw.stop()


def test_public_address_without_keys_is_refused() -> None:
    run = subprocess.run([sys.executable, "-m", "zembed", "gateway", "--listen",
                          f"0.0.0.0:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "--api-keys-file" in run.stderr and "--insecure-no-auth" in run.stderr


def test_workers_each_serve_and_metrics_sum_them(lanes: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    gw = start_gateway(lanes, "--workers", "2")
    try:
        for i in range(12):  # a new connection each: the kernel spreads them over the workers
            assert gw.post("/v1/embeddings", {"input": f"w{i}"})[0] == 200
        deadline = time.monotonic() + 10
        while True:
            families = {f.name: f for f in text_string_to_metric_families(
                gw.call("GET", "/metrics")[2].decode())}
            ok = sum(s.value for s in families["zembed_gateway_requests"].samples
                     if s.labels == {"route": "/v1/embeddings", "status": "200"})
            workers = families["zembed_gateway_workers"].samples[0].value
            if (ok, workers) == (12, 2):
                break
            assert time.monotonic() < deadline, f"metrics say {ok} requests, {workers} workers"
            time.sleep(0.3)
        assert families["zembed_gateway_broker_connections"].samples[0].value == 2
    finally:
        gw.stop()

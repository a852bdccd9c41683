"""The gateway's parts one at a time: parsing, answers, model names, keys, metrics, config."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zembed.config import GatewayConfig
from zembed.errors import DeadlineExceeded, EngineUnavailable, Overloaded, TooLarge
from zembed.gateway import auth, openai_api, tei
from zembed.gateway.dispatch import image_input, request_class
from zembed.gateway.errors import HttpError, from_zembed
from zembed.gateway.metrics import Metrics
from zembed.gateway.models import Models, parse_aliases
from zembed.gateway.serve import GatewayConfigError, check, split_listen


def info(text_model: str | None = "sentence-transformers/all-MiniLM-L6-v2",
         image_model: str | None = "ViT-B-32") -> dict[str, Any]:
    return {"limits": {"max_items": 256}, "lanes": {
        "text": {"kinds": ["text"], "model": text_model, "max_request_items": 64},
        "image": {"kinds": ["clip-text", "image"], "model": image_model,
                  "max_request_items": 16}}}


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "header_s", "header_ms"), [
    (0.25, "1", "250"), (1.0, "1", "1000"), (1.2, "2", "1200"), (0.0001, "1", "1")])
def test_retry_after_is_whole_seconds_rounded_up_and_exact_ms(seconds: float, header_s: str,
                                                              header_ms: str) -> None:
    headers = dict(HttpError(429, "busy", "overloaded", retry_after_s=seconds).retry_headers())
    assert headers == {b"retry-after": header_s.encode(), b"retry-after-ms": header_ms.encode()}


def test_zembed_errors_map_to_http() -> None:
    over = from_zembed(Overloaded("no credits", retry_after=0.08))
    assert (over.status, over.code, over.retry_after_s) == (429, "overloaded", 0.08)
    body = json.loads(over.openai_body())["error"]
    assert body == {"message": "no credits", "type": "rate_limit_exceeded", "param": None,
                    "code": "overloaded"}
    assert from_zembed(TooLarge("big"), where="input[3]: ").message == "input[3]: big"
    assert from_zembed(TooLarge("big")).status == 413
    gone = from_zembed(EngineUnavailable("no engine"))
    assert gone.status == 503 and gone.retry_after_s == 1.0
    assert from_zembed(DeadlineExceeded("late")).status == 504
    assert json.loads(gone.tei_body()) == {"error": "no engine", "error_type": "Unhealthy"}


# -- OpenAI and TEI bodies ---------------------------------------------------------------------

def test_openai_parse_accepts_what_the_api_accepts() -> None:
    req = openai_api.parse({"input": "one", "model": "m", "user": "u", "dimensions": 8,
                            "encoding_format": "base64", "extra_field": [1]}, 2048)
    assert (req.inputs, req.model, req.base64, req.dimensions, req.modality) == (
        ["one"], "m", True, 8, "text")
    req = openai_api.parse({"input": ["a", "b"], "encoding_format": None}, 2048)
    assert (req.inputs, req.model, req.base64, req.dimensions) == (["a", "b"], None, False, None)
    assert openai_api.parse({"input": ["i"], "modality": "image", "input_type": "query"},
                            10).input_type == "query"
    assert openai_api.parse({"input": "x", "priority": "bulk"}, 10).priority == "bulk"
    assert openai_api.parse({"input": "x"}, 10).priority is None  # the broker's default


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"input": [1, 2]}, 400, "token_ids_not_supported"),
    ({"input": [[1], [2, 3]]}, 400, "token_ids_not_supported"),
    ({"input": ["a", None]}, 400, "invalid_request"),
    ({"input": ["a"] * 11}, 413, "too_many_inputs"),
    ({"input": "a", "dimensions": 0}, 400, "invalid_request"),
    ({"input": "a", "dimensions": 1.5}, 400, "invalid_request"),
    ({"input": "a", "modality": "audio"}, 400, "invalid_request"),
    ({"input": "a", "input_type": 3}, 400, "invalid_request"),
    ({"input": "a", "priority": "urgent"}, 400, "invalid_request"),
    ("a string", 400, "invalid_request"),
])
def test_openai_parse_refuses_with_a_reason(body: Any, status: int, code: str) -> None:
    with pytest.raises(HttpError) as info_:
        openai_api.parse(body, 10)
    assert (info_.value.status, info_.value.code) == (status, code)
    assert info_.value.message


def test_openai_render_shape_floats_and_base64_are_exact() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((3, 5)).astype(np.float32)
    body = json.loads(openai_api.render(vectors, "m", False))
    assert list(body) == ["object", "data", "model", "usage"]
    assert [list(d) for d in body["data"]] == [["object", "index", "embedding"]] * 3
    assert np.array_equal(np.array([d["embedding"] for d in body["data"]], np.float32), vectors)
    b64 = json.loads(openai_api.render(vectors, "m", True))
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]]
    assert np.array_equal(np.stack(rows), vectors)
    assert json.loads(openai_api.render_models([("a", "text")]))["data"][0]["id"] == "a"


def test_tei_parse_and_render() -> None:
    req = tei.parse({"inputs": "x", "normalize": False, "truncate": True,
                     "truncation_direction": "Right", "prompt_name": "query"}, 32)
    assert (req.inputs, req.normalize, req.prompt_name) == (["x"], False, "query")
    for bad in ({"inputs": "x", "normalize": "no"}, {"inputs": "x", "truncate": 1},
                {"inputs": "x", "truncation_direction": "Left"}, {"input": "x"}):
        with pytest.raises(HttpError):
            tei.parse(bad, 32)
    vectors = np.eye(2, dtype=np.float32)
    assert json.loads(tei.render(vectors)) == [[1.0, 0.0], [0.0, 1.0]]


def test_request_class_is_named_or_follows_input_type() -> None:
    assert request_class(None, None) == request_class(None, "query") == "interactive"
    assert request_class(None, "document") == "bulk"
    assert request_class("interactive", "document") == "interactive"


def test_image_inputs() -> None:
    assert image_input("data:image/png;base64,AAAA", 0) == "data:image/png;base64,AAAA"
    assert image_input("https://example.com/a.png", 0) == "https://example.com/a.png"
    assert image_input(base64.b64encode(b"\x89PNG").decode(), 0) == b"\x89PNG"
    with pytest.raises(HttpError) as info_:
        image_input("/etc/passwd", 4)  # never a path: the gateway reads no files for a client
    assert "input[4]" in info_.value.message


# -- model names -----------------------------------------------------------------------------

def test_model_names_resolve_to_lanes_and_kinds() -> None:
    models = Models(parse_aliases(("text-embedding-3-small=text", "clip=image")))
    models.update(info())
    for name in ("sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2", "TEXT",
                 "text-embedding-3-small"):
        target = models.resolve(name, "text")
        assert (target.lane, target.kind, target.model) == ("text", "text", name)
    assert models.resolve(None, "text").model == "sentence-transformers/all-MiniLM-L6-v2"
    assert models.resolve("ViT-B-32", "text").kind == "clip-text"
    assert models.resolve("clip", "image").kind == "image"
    assert models.resolve("clip", "image").max_request_items == 16
    with pytest.raises(HttpError) as info_:
        models.resolve("all-MiniLM-L6-v2", "image")
    assert info_.value.status == 400 and info_.value.param == "modality"
    with pytest.raises(HttpError) as info_:
        models.resolve("gpt-4", "text")
    assert info_.value.status == 404 and "all-MiniLM-L6-v2" in info_.value.message
    assert ("text-embedding-3-small", "text") in models.served()


def test_names_outlive_their_engines_and_unknown_waits_for_them() -> None:
    models = Models()
    models.update(info())
    models.update(info(text_model=None))  # the text engines left (a broker restart)
    assert models.resolve("all-MiniLM-L6-v2", "text").lane == "text"
    fresh = Models()
    fresh.update(info(text_model=None))  # never seen: maybe that lane's, once it has one
    with pytest.raises(HttpError) as info_:
        fresh.resolve("all-MiniLM-L6-v2", "text")
    assert info_.value.status == 503


def test_bad_aliases() -> None:
    for spec in ("noequals", "=text", "name="):
        with pytest.raises(ValueError, match="NAME=LANE"):
            parse_aliases((spec,))


# -- API keys --------------------------------------------------------------------------------

def test_api_keys_reload_and_keep_the_last_good_set(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys"
    path.write_text("# comment\nalpha\n\n beta \n")
    keys = auth.ApiKeys(str(path))
    assert keys.allows(b"Bearer alpha") and keys.allows(b"bearer beta")
    for bad in (None, b"", b"Bearer", b"Bearer gamma", b"Basic alpha", b"alpha"):
        assert not keys.allows(bad)
    path.write_text("gamma\n")
    assert keys.allows(b"Bearer gamma") and not keys.allows(b"Bearer alpha")
    path.write_text("two words\n")  # unreadable: the last good keys stay
    assert keys.allows(b"Bearer gamma")
    path.unlink()
    assert keys.allows(b"Bearer gamma")
    with pytest.raises(OSError):
        auth.ApiKeys(str(path))  # at start a missing file is an error


# -- metrics ---------------------------------------------------------------------------------

def test_metrics_parse_and_sum_over_workers(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    other = Metrics()
    other.observe("/v1/embeddings", 200, 0.004, inputs=3)
    other.connected = True
    (tmp_path / "999999.json").write_text(json.dumps(other.snapshot()))
    mine = Metrics(str(tmp_path))
    mine.observe("/v1/embeddings", 200, 0.02, inputs=1)
    mine.observe("/v1/embeddings", 429, 0.0005)
    families = {f.name: f for f in text_string_to_metric_families(mine.render().decode())}
    requests = {(s.labels["route"], s.labels["status"]): s.value
                for s in families["zembed_gateway_requests"].samples}
    assert requests == {("/v1/embeddings", "200"): 2, ("/v1/embeddings", "429"): 1}
    assert families["zembed_gateway_inputs"].samples[0].value == 4
    buckets = {s.labels["le"]: s.value
               for s in families["zembed_gateway_request_duration_seconds"].samples
               if s.name.endswith("_bucket")}
    assert (buckets["0.001"], buckets["0.005"], buckets["0.025"], buckets["+Inf"]) == (1, 2, 3, 3)
    assert families["zembed_gateway_workers"].samples[0].value == 2
    assert families["zembed_gateway_broker_connections"].samples[0].value == 1
    assert any(p.name.endswith(".json") for p in tmp_path.iterdir())


# -- configuration ---------------------------------------------------------------------------

def test_listen_and_the_public_address_rule(tmp_path: Path) -> None:
    assert split_listen("[::1]:8080") == ("::1", 8080)
    assert split_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    for bad in ("8080", "host:", ":80", "host:http"):
        with pytest.raises(GatewayConfigError):
            split_listen(bad)
    assert check(GatewayConfig(listen="localhost:8080")) == ("localhost", 8080)
    with pytest.raises(GatewayConfigError, match="--api-keys-file"):
        check(GatewayConfig(listen="0.0.0.0:8080"))
    assert check(GatewayConfig(listen="0.0.0.0:8080", insecure_no_auth=True))[1] == 8080
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    assert check(GatewayConfig(listen="10.1.2.3:8080", api_keys_file=str(keys)))
    with pytest.raises(GatewayConfigError, match="api-keys-file"):
        check(GatewayConfig(api_keys_file=str(tmp_path / "missing")))
    with pytest.raises(GatewayConfigError, match="together"):
        check(GatewayConfig(tls_certfile="cert.pem"))
    with pytest.raises(GatewayConfigError, match="NAME=LANE"):
        check(GatewayConfig(model_aliases=("bad",)))

"""The gateway's ASGI app: routes, body limits, keys, and one broker client per worker.

A plain ASGI callable rather than a web framework: the gateway's whole job per request is
read a body, check it, one broker round trip, write JSON, and a framework's routing and
request objects would cost more than that (benchmarks/README.md, *HTTP stack*). Every answer
is built here; the broker does the rest. Nothing is queued: a request is either sent on at
once or answered with an error at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from zembed import __version__
from zembed.client.aio import AsyncClient
from zembed.config import GatewayConfig
from zembed.errors import ZembedError
from zembed.gateway import dispatch, openai_api, tei
from zembed.gateway.auth import ApiKeys
from zembed.gateway.errors import HttpError, from_zembed, unreachable
from zembed.gateway.metrics import Metrics
from zembed.gateway.models import Models, Target, parse_aliases

log = logging.getLogger("zembed.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]

#: The broker's ``info`` is read again this often (lanes, models, credits).
INFO_REFRESH_S = 2.0
#: A starting worker waits this long for its broker connection before taking requests, s.
CONNECT_WAIT_S = 3.0
#: ``/health`` and ``/ready`` wait this long for the broker, s.
PROBE_TIMEOUT_S = 2.0
#: Environment variable that hands the configuration to uvicorn's worker processes.
CONFIG_ENV = "ZEMBED_GATEWAY_CONFIG_JSON"
#: ...and the folder where the workers share their metrics (gateway/metrics.py).
METRICS_DIR_ENV = "ZEMBED_GATEWAY_METRICS_DIR"

JSON = (b"content-type", b"application/json")
TEXT = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")

#: Routes -> (method, handler name, dialect of errors, needs a key).
ROUTES: dict[str, tuple[str, str, str, bool]] = {
    "/v1/embeddings": ("POST", "_openai_embeddings", "openai", True),
    "/embeddings": ("POST", "_openai_embeddings", "openai", True),
    "/embed": ("POST", "_tei_embed", "tei", True),
    # TEI answers its model's task at the root too; huggingface_hub's InferenceClient, given
    # a base_url, posts there.
    "/": ("POST", "_tei_embed", "tei", True),
    "/v1/models": ("GET", "_models", "openai", True),
    "/models": ("GET", "_models", "openai", True),
    "/health": ("GET", "_health", "openai", False),
    "/ready": ("GET", "_ready", "openai", False),
    "/metrics": ("GET", "_metrics", "openai", False),
}


#: ``GET /v1/models/{id}`` (the openai SDKs' ``models.retrieve``).
MODEL_PREFIXES = ("/v1/models/", "/models/")


class Gateway:
    """One worker's app: ``await gateway(scope, receive, send)``."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.models = Models(parse_aliases(cfg.model_aliases), cfg.default_lane)
        self.keys = ApiKeys(cfg.api_keys_file) if cfg.api_keys_file else None
        self.metrics = Metrics(os.environ.get(METRICS_DIR_ENV))
        self.client: AsyncClient | None = None
        self._refresher: asyncio.Task[None] | None = None

    # -- lifespan ------------------------------------------------------------------------

    async def startup(self) -> None:
        """Connect to the broker and read its ``info`` before taking requests.

        ZeroMQ dials in the background; a worker that took requests at once would answer its
        first ones 503 (no connection yet) while the broker is fine. So startup waits up to
        ``CONNECT_WAIT_S`` for the connection; a broker that is down then is no reason not to
        start (requests get 503 until it is up).
        """
        self.client = AsyncClient(self.cfg.broker, timeout=self.cfg.timeout_s, retries=0,
                                  curve_secret_key=self.cfg.curve_secret_key,
                                  curve_server_key=self.cfg.curve_server_key,
                                  heartbeat_ms=self.cfg.heartbeat_ms)
        deadline = time.monotonic() + CONNECT_WAIT_S
        while not self.client.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not self.client.connected:
            log.warning("no connection to the broker at %s yet: answering 503 until there is",
                        self.cfg.broker)
        self._refresher = asyncio.ensure_future(self._refresh_info())

    async def shutdown(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def _refresh_info(self) -> None:
        """Every ``INFO_REFRESH_S``: the broker's ``info``; every second: this worker's
        metrics for the others."""
        ticks = 0
        while True:
            if ticks % int(INFO_REFRESH_S) == 0:
                await self.read_info()
            self.metrics.connected = self.client is not None and self.client.connected
            self.metrics.publish()
            ticks += 1
            await asyncio.sleep(1.0)

    async def read_info(self) -> bool:
        """Read the broker's ``info`` now; False when it did not answer."""
        client = self.client
        if client is None or not client.connected:
            return False
        try:
            self.models.update(await client.info(timeout=PROBE_TIMEOUT_S))
        except ZembedError:
            return False
        return True

    # -- ASGI ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        path = scope["path"]
        route = ROUTES.get(path)
        if route is None and path.startswith(MODEL_PREFIXES):
            route = ("GET", "_model", "openai", True)  # GET /v1/models/{id}
        dialect = route[2] if route else "openai"
        self.metrics.in_flight += 1
        inputs = 0
        try:
            if route is None:
                raise HttpError(404, f"no route {path}; see docs/http.md", "not_found")
            method, handler, _, keyed = route
            if scope["method"] != method:
                raise HttpError(405, f"{path} takes {method}, not {scope['method']}",
                                "method_not_allowed", headers=[(b"allow", method.encode())])
            if keyed and self.keys is not None and not self.keys.allows(
                    _header(scope, b"authorization")):
                raise HttpError(401, "a valid API key is required: Authorization: Bearer KEY",
                                "invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
            status, body, headers = await getattr(self, handler)(scope, receive)
            inputs = int(scope.get("zembed.inputs", 0))
        except HttpError as exc:
            status, headers = exc.status, [JSON, *exc.retry_headers(), *exc.headers]
            body = exc.tei_body() if dialect == "tei" else exc.openai_body()
        except Exception:  # a bug here must not take the worker down
            log.exception("answering %s %s", scope.get("method"), path)
            status, headers = 500, [JSON]
            body = HttpError(500, "internal error in the gateway (logged)",
                             "internal_error").openai_body()
        finally:
            self.metrics.in_flight -= 1
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.observe(_route_label(path, route is not None), status,
                             time.perf_counter() - started, inputs)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _json_body(self, scope: Scope, receive: Receive) -> Any:
        """The request body decoded, within ``max_body_bytes`` (checked before reading)."""
        limit = self.cfg.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise HttpError(400, "Content-Length is not a number", "invalid_request") from None
            if length > limit:
                raise _too_big(length, limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "the client went away", "client_disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_big(size, limit)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc}", "invalid_json") from None

    async def _models_known(self, *, fresh: bool = False) -> Models:
        """The model names, with ``info`` read first when it never was (or ``fresh``); a 503
        when the broker has never answered it."""
        read = await self.read_info() if fresh or not self.models.known else True
        if not read and not self.models.known:
            raise unreachable(self.cfg.broker)
        return self.models

    async def _target(self, model: str | None, modality: str) -> Target:
        """Where ``model`` goes."""
        return (await self._models_known()).resolve(model, modality)

    async def _vectors(self, scope: Scope, target: Target, items: list[Any], *,
                       normalize: bool, dimensions: int | None,
                       input_type: str | None,
                       priority: str | None = None) -> tuple[Any, list[tuple[bytes, bytes]]]:
        """The vectors, and the headers that say how many inputs the cache served."""
        assert self.client is not None
        vectors, cached = await dispatch.embed(
            self.client, target, items, normalize=normalize, dimensions=dimensions,
            input_type=input_type, timeout_s=self.cfg.timeout_s, priority=priority)
        scope["zembed.inputs"] = len(items)
        return vectors, [JSON, (b"x-zembed-cached", str(cached).encode())]

    # -- routes --------------------------------------------------------------------------

    async def _openai_embeddings(self, scope: Scope, receive: Receive) -> Answer:
        req = openai_api.parse(await self._json_body(scope, receive), self.cfg.max_inputs)
        target = await self._target(req.model, req.modality)
        items: list[Any] = req.inputs
        if req.modality == "image":
            items = [dispatch.image_input(v, i) for i, v in enumerate(items)]
        vectors, headers = await self._vectors(scope, target, items, normalize=True,
                                               dimensions=req.dimensions,
                                               input_type=req.input_type,
                                               priority=req.priority)
        return 200, openai_api.render(vectors, target.model, req.base64), headers

    async def _tei_embed(self, scope: Scope, receive: Receive) -> Answer:
        req = tei.parse(await self._json_body(scope, receive), self.cfg.max_inputs)
        target = await self._target(None, "text")
        vectors, headers = await self._vectors(scope, target, req.inputs,
                                               normalize=req.normalize,
                                               dimensions=req.dimensions,
                                               input_type=req.prompt_name)
        return 200, tei.render(vectors), headers

    async def _models(self, scope: Scope, receive: Receive) -> Answer:
        models = await self._models_known(fresh=True)
        return 200, openai_api.render_models(models.served()), [JSON]

    async def _model(self, scope: Scope, receive: Receive) -> Answer:
        """One model by name (404 when no lane answers to it)."""
        name = scope["path"].split("/models/", 1)[1]
        lane = (await self._models_known()).lane_of(name)
        return 200, openai_api.render_model(name, lane), [JSON]

    async def _health(self, scope: Scope, receive: Receive) -> Answer:
        """200 when this worker and its broker connection answer; 503 with the reason."""
        assert self.client is not None
        body: dict[str, Any] = {"status": "ok", "version": __version__, "pid": os.getpid(),
                                "broker": self.cfg.broker}
        try:
            if not self.client.connected:
                raise HttpError(503, "no connection to the broker", "broker_unreachable")
            loop = await self.client.health(timeout=PROBE_TIMEOUT_S)
            body["broker_loop"] = loop.get("loop")
        except (HttpError, ZembedError) as exc:
            body.update(status="unavailable", reason=str(getattr(exc, "message", exc)))
            return 503, orjson.dumps(body), [JSON]
        return 200, orjson.dumps(body), [JSON]

    async def _ready(self, scope: Scope, receive: Receive) -> Answer:
        """The broker's ``ready``: 200 when every lane has an engine (and the cache answers)."""
        assert self.client is not None
        if not self.client.connected:
            return 503, orjson.dumps({"ready": False, "missing": ["broker"], "reasons": [
                f"no connection to the broker at {self.cfg.broker}"]}), [JSON]
        try:
            state = await self.client.ready(timeout=PROBE_TIMEOUT_S)
        except ZembedError as exc:
            err = from_zembed(exc)
            return 503, orjson.dumps({"ready": False, "missing": ["broker"],
                                      "reasons": [err.message]}), [JSON]
        body = {k: state.get(k) for k in ("ready", "missing", "reasons")}
        return (200 if state.get("ready") else 503), orjson.dumps(body), [JSON]

    async def _metrics(self, scope: Scope, receive: Receive) -> Answer:
        self.metrics.connected = self.client is not None and self.client.connected
        return 200, self.metrics.render(), [TEXT]


def _route_label(path: str, known: bool) -> str:
    """The ``route`` label of a request's metrics: a bounded set, whatever the paths sent."""
    if not known:
        return "other"
    return "/v1/models/{id}" if path.startswith(MODEL_PREFIXES) else path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return bytes(value)
    return None


def _too_big(size: int, limit: int) -> HttpError:
    return HttpError(413, f"the body is {size} bytes; at most {limit} are accepted",
                     "body_too_large")


def config_to_env(cfg: GatewayConfig) -> str:
    """The configuration as the JSON that :func:`create_app` reads in each worker."""
    return json.dumps(dataclasses.asdict(cfg))


def create_app() -> Gateway:
    """uvicorn's app factory (``--factory``): the configuration comes from ``CONFIG_ENV``."""
    raw = os.environ.get(CONFIG_ENV)
    values: dict[str, Any] = json.loads(raw) if raw else {}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return Gateway(GatewayConfig(**values))

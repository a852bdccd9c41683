"""Configuration: one dataclass per process, built from a TOML file, then ``ZEMBED_*``, then flags.

Each field documents itself (``metadata["help"]``, unit in the name or the help), so the CLI
options, the environment variables and ``docs/configuration.md`` all come from one place.

Precedence, lowest to highest: dataclass default < TOML file section < environment < CLI flag.
The TOML file has one table per process (``[broker]``, ``[text]``, ``[client]``, ``[gateway]``...); the
environment variable of a field is ``ZEMBED_<SECTION>_<FIELD>`` (``ZEMBED_TEXT_CREDITS=64``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from zembed import protocol as p

T = TypeVar("T")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


#: Options several processes share, defined once as (default, help).
_SHARED_OPTS: dict[str, tuple[Any, str]] = {
    "broker": (p.DEFAULT_BACKEND, "Broker backend endpoint to connect to; several brokers "
               "comma-separated: the engine serves them all, its credits split between them."),
    "device": ("auto", "auto, cpu, cuda or cuda:N."),
    "client_heartbeat_ms": (1000, "ZMTP heartbeat period on each broker connection, ms: a "
                            "broker silent for 3 periods is given up and its requests resent "
                            "to another."),
    "dtype": ("auto", "auto, fp32, bf16 or fp16 for the forward pass (auto: bf16 where native)."),
    "threads": (
        0, "torch intra-op threads; 0 = available cores minus one (one left for socket work)."
    ),
    "max_wait_ms": (
        0.0, "Extra wait for a batch to fill before the forward pass; 0 = take what is queued, ms."
    ),
    "max_batch": (
        0, "Most items in one forward pass; 0 = sized at warm-up from the measured throughput "
        "curve and latency_target_ms, items."
    ),
    "latency_target_ms": (
        200.0, "Latency a request should see when this engine is sized at warm-up (credits or "
        "max_batch 0): a forward pass may take at most half of it, ms."
    ),
    "batch_delay_file": (
        "", "Tests only: a file holding a number of milliseconds every batch sleeps before its "
        "forward pass, re-read each batch (stands in for a slowed engine); empty = off."
    ),
    "heartbeat_interval_ms": (p.HEARTBEAT_INTERVAL_MS, "Heartbeat period to the broker, ms."),
    "heartbeat_liveness": (
        p.HEARTBEAT_LIVENESS, "Missed broker heartbeats after which the engine reconnects."
    ),
    "stall_timeout_s": (
        60.0, "A forward pass running longer than this stops heartbeats (engine reported dead), s."
    ),
    "log_level": ("info", "Logging level (debug, info, warning, error)."),
    "curve_secret_key": (
        "", "CurveZMQ: this process's .key_secret file (zembed keygen); empty = no CURVE."
    ),
    "curve_server_key": ("", "CurveZMQ: the broker's public .key file (with curve_secret_key)."),
}


def _shared_opt(name: str) -> Any:
    return _opt(*_SHARED_OPTS[name])


@dataclass(frozen=True)
class BrokerConfig:
    """Settings of the broker process (``zembed start broker``)."""

    section: ClassVar[str] = "broker"

    frontend: str = _opt(p.DEFAULT_FRONTEND, "Endpoint the client ROUTER binds (tcp/ipc).")
    backend: str = _opt(p.DEFAULT_BACKEND, "Endpoint the engine ROUTER binds (tcp/ipc).")
    lanes: tuple[str, ...] = _opt(
        (p.LANE_TEXT, p.LANE_IMAGE),
        "Lanes this broker serves (comma-separated); `ready` needs all of them.",
    )
    heartbeat_interval_ms: int = _opt(p.HEARTBEAT_INTERVAL_MS, "Heartbeat period to engines, ms.")
    heartbeat_liveness: int = _opt(
        p.HEARTBEAT_LIVENESS, "Missed heartbeat intervals after which an engine is dead."
    )
    max_items: int = _opt(256, "Most items in one request (413 above).")
    bulk_reserve: float = _opt(
        0.25, "Share of each engine's credits that bulk requests (priority bulk: embed_many, "
        "input_type document) may not take, kept for interactive ones; 0 = one pool."
    )
    latency_target_ms: tuple[str, ...] = _opt(
        (), "Adaptive credits: LANE=MS pairs (comma-separated), or one MS for every lane; the "
        "broker moves each engine's credits (AIMD, at most what it announced) so that accepted "
        "requests finish within the target; empty = the engines' fixed credits."
    )
    adaptive_min_credits: int = _opt(
        0, "Adaptive credits never go below this per engine; 0 = the engine's max_batch (it "
        "still runs full batches), items."
    )
    max_item_bytes: int = _opt(65_536, "Most UTF-8 bytes in one text item, 413 above.")
    max_image_bytes: int = _opt(
        10 << 20, "Most bytes in one image item (encoded image or URL), 413 above."
    )
    max_request_bytes: int = _opt(64 << 20, "Most bytes in one request body, 413 above.")
    max_message_bytes: int = _opt(
        80 << 20, "ZMQ_MAXMSGSIZE on the frontend: a bigger frame disconnects its sender, bytes."
    )
    max_queued_per_client: int = _opt(
        10_000, "Requests queued in ZeroMQ per client connection before the broker stops "
        "reading it (TCP backpressure; bounds memory under floods)."
    )
    max_replies_queued_per_client: int = _opt(
        1000, "Replies libzmq queues per client connection (SNDHWM); past it replies wait in "
        "the broker's own byte-bounded backlog, messages."
    )
    max_reply_backlog_bytes: int = _opt(
        16 << 20, "Per client: bytes of large replies (16 KiB+) libzmq may queue, and as many "
        "again in the broker's backlog; past that the client is cut off (backlog dropped, its "
        "requests refused until it reads), bytes."
    )
    default_deadline_ms: int = _opt(
        p.DEFAULT_DEADLINE_MS, "Deadline for requests that carry none, ms."
    )
    max_deadline_ms: int = _opt(300_000, "Longest deadline a request may ask for, ms.")
    cache: str = _opt(
        "auto", "auto (Redis on 127.0.0.1:6379 if it answers at start, else memory), off, "
        "memory, a redis://, rediss:// (TLS) or unix:// URL, or redis+cluster://host:port"
        "[,host:port...] (Redis Cluster seed nodes; rediss+cluster:// for TLS).",
    )
    cache_ttl_s: int = _opt(7 * 24 * 3600, "Expiry of each cached vector, s.")
    cache_timeout_ms: int = _opt(
        50, "A loop turn's budget for cache reads, ms: keys it does not reach, and reads that "
        "fail or time out, are misses (failures also count as errors)."
    )
    cache_memory_items: int = _opt(200_000, "Vectors kept by the in-process memory cache.")
    cache_prefix: str = _opt("zembed", "Prefix of every cache key (several zembeds, one Redis).")
    curve_secret_key: str = _opt(
        "", "CurveZMQ: the broker's .key_secret file; empty = no CURVE (plain TCP)."
    )
    curve_clients_dir: str = _opt(
        "", "CurveZMQ: directory of the public keys (*.key) of clients allowed on the frontend."
    )
    curve_engines_dir: str = _opt(
        "", "CurveZMQ: directory of the public keys (*.key) of engines allowed on the backend."
    )
    stats_endpoint: str = _opt(
        p.DEFAULT_STATS, "Endpoint the stats PUB socket binds (loopback by default); empty = off."
    )
    stats_interval_s: float = _opt(1.0, "Period of the stats snapshots on the PUB socket, s.")
    loop_stall_s: float = _opt(
        5.0, "A loop turn longer than this is logged with the loop's stack (watchdog); 0 = off, s."
    )
    log_level: str = _shared_opt("log_level")


@dataclass(frozen=True)
class TextEngineConfig:
    """Settings of a text engine process (``zembed start text``)."""

    section: ClassVar[str] = "text"

    broker: str = _shared_opt("broker")
    lane: str = _opt(p.LANE_TEXT, "Lane this engine registers for.")
    model: str = _opt(
        "", "Hugging Face model id or local path; empty = bundled all-MiniLM-L6-v2 (offline)."
    )
    device: str = _shared_opt("device")
    dtype: str = _shared_opt("dtype")
    threads: int = _shared_opt("threads")
    credits: int = _opt(
        0, "Items this engine holds in flight (its admission budget; bounds queueing); "
        "0 = sized at warm-up (twice the batch, one latency target's worth, or 64), items."
    )
    max_batch: int = _shared_opt("max_batch")
    latency_target_ms: float = _shared_opt("latency_target_ms")
    batch_delay_file: str = _shared_opt("batch_delay_file")
    max_batch_tokens: int = _opt(
        -1, "Most tokens in one forward pass after padding (items x longest); -1 = sized at "
        "warm-up (what a pass of long texts gets through in half of latency_target_ms, at "
        "least 32 per item of the batch); 0 = no limit."
    )
    max_wait_ms: float = _shared_opt("max_wait_ms")
    max_length: int = _opt(0, "Truncate inputs to this many tokens; 0 = the model's own limit.")
    batch_invariant: bool = _opt(
        True, "Pad each input to its own length bucket (a multiple of 8 tokens) and run only one "
        "bucket per transformer pass, so an input's vector never depends on what it was batched "
        "with (docs/cache.md); off = pad each pass to its longest input."
    )
    query_prefix: str = _opt("", "Text prepended to items sent with input_type=query.")
    document_prefix: str = _opt("", "Text prepended to items sent with input_type=document.")
    dimensions: str = _opt(
        "auto", "Whether a request may ask for fewer dimensions (a Matryoshka prefix): auto = "
        "when the model card says it was trained for it (MatryoshkaLoss), on, or off."
    )
    heartbeat_interval_ms: int = _shared_opt("heartbeat_interval_ms")
    heartbeat_liveness: int = _shared_opt("heartbeat_liveness")
    stall_timeout_s: float = _shared_opt("stall_timeout_s")
    curve_secret_key: str = _shared_opt("curve_secret_key")
    curve_server_key: str = _shared_opt("curve_server_key")
    log_level: str = _shared_opt("log_level")


@dataclass(frozen=True)
class ImageEngineConfig:
    """Settings of an image engine process (``zembed start image``): open_clip, images + CLIP text."""

    section: ClassVar[str] = "image"

    broker: str = _shared_opt("broker")
    lane: str = _opt(p.LANE_IMAGE, "Lane this engine registers for.")
    model: str = _opt("ViT-B-32", "open_clip architecture name (see open_clip.list_models()).")
    pretrained: str = _opt(
        "openai", "open_clip pretrained tag (downloaded where a network allows) or checkpoint file."
    )
    model_config: str = _opt(
        "", "JSON file with an open_clip model config to register (its name is the file stem)."
    )
    random_weights: bool = _opt(
        False, "Serve seeded random weights instead (smoke tests, benchmarks); flagged everywhere."
    )
    device: str = _shared_opt("device")
    dtype: str = _shared_opt("dtype")
    threads: int = _shared_opt("threads")
    credits: int = _opt(
        0, "Items this engine holds in flight (its admission budget); 0 = sized at warm-up "
        "(twice the batch, one latency target's worth, or 16), items."
    )
    max_batch: int = _shared_opt("max_batch")
    latency_target_ms: float = _shared_opt("latency_target_ms")
    batch_delay_file: str = _shared_opt("batch_delay_file")
    max_wait_ms: float = _shared_opt("max_wait_ms")
    decode_workers: int = _opt(
        0, "Threads decoding and preprocessing images; 0 = half the available cores (>= 1)."
    )
    decode: str = _opt(
        "cpu", "Where JPEGs are decoded: cpu (PIL on the decode threads) or gpu (nvJPEG and "
        "tensor preprocessing on the model's CUDA device; other formats stay on the CPU).",
    )
    draft: bool = _opt(
        True, "Decode JPEGs at reduced scale when still >= the model's input size (faster)."
    )
    max_pixels: int = _opt(
        40_000_000, "Largest image accepted, in pixels (decompression-bomb guard), pixels."
    )
    min_side: int = _opt(8, "Smallest accepted width or height, pixels.")
    fetch_urls: bool = _opt(False, "Allow http(s) URLs as image items (off by default).")
    fetch_allow_hosts: tuple[str, ...] = _opt(
        (), "Hosts URLs may point to (comma-separated); required when fetch_urls is on."
    )
    fetch_max_bytes: int = _opt(10 << 20, "Largest download per URL, bytes.")
    fetch_timeout_s: float = _opt(5.0, "Timeout of one URL download, s.")
    heartbeat_interval_ms: int = _shared_opt("heartbeat_interval_ms")
    heartbeat_liveness: int = _shared_opt("heartbeat_liveness")
    stall_timeout_s: float = _shared_opt("stall_timeout_s")
    curve_secret_key: str = _shared_opt("curve_secret_key")
    curve_server_key: str = _shared_opt("curve_server_key")
    log_level: str = _shared_opt("log_level")


@dataclass(frozen=True)
class ClientConfig:
    """Settings the CLI's client commands use (``zembed embed``, ``ping``, ``ready``...)."""

    section: ClassVar[str] = "client"

    endpoint: str = _opt(
        p.DEFAULT_FRONTEND, "Broker frontend endpoint to connect to; several brokers "
        "comma-separated (requests are spread over those up, and fail over)."
    )
    timeout_s: float = _opt(10.0, "Deadline of each request, s.")
    heartbeat_ms: int = _shared_opt("client_heartbeat_ms")
    curve_secret_key: str = _shared_opt("curve_secret_key")
    curve_server_key: str = _shared_opt("curve_server_key")
    stats_endpoint: str = _opt(
        p.DEFAULT_STATS, "Broker stats PUB endpoint that `zembed stats` and the exporter read."
    )


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of the HTTP gateway (``zembed gateway``): OpenAI and TEI routes over a broker."""

    section: ClassVar[str] = "gateway"

    broker: str = _opt(
        p.DEFAULT_FRONTEND, "Broker frontend endpoint each worker connects to; several brokers "
        "comma-separated."
    )
    listen: str = _opt("127.0.0.1:8080", "HOST:PORT the HTTP server binds (loopback by default).")
    heartbeat_ms: int = _shared_opt("client_heartbeat_ms")
    workers: int = _opt(1, "Worker processes, each with its own broker connection.")
    timeout_s: float = _opt(
        30.0, "Longest a request waits for all its vectors (a split one included); 504 after, s."
    )
    max_body_bytes: int = _opt(
        32 << 20, "Largest request body, 413 above (Content-Length checked before reading), bytes."
    )
    max_inputs: int = _opt(2048, "Most inputs in one request (OpenAI's limit), 413 above.")
    model_aliases: tuple[str, ...] = _opt(
        (), "More model names, NAME=LANE, comma-separated (text-embedding-3-small=text)."
    )
    default_lane: str = _opt(
        p.LANE_TEXT, "Lane of requests that name no model (TEI's /embed; OpenAI without model)."
    )
    api_keys_file: str = _opt(
        "", "File of API keys, one per line (Authorization: Bearer KEY); re-read when it "
        "changes. Empty = no keys."
    )
    insecure_no_auth: bool = _opt(
        False, "Allow a non-loopback listen address without API keys (a proxy in front "
        "authenticates)."
    )
    tls_certfile: str = _opt("", "PEM certificate (chain) to serve HTTPS; empty = plain HTTP.")
    tls_keyfile: str = _opt("", "PEM private key of tls_certfile.")
    access_log: bool = _opt(False, "Log every request (costs CPU at thousands of requests/s).")
    curve_secret_key: str = _shared_opt("curve_secret_key")
    curve_server_key: str = _shared_opt("curve_server_key")
    log_level: str = _shared_opt("log_level")


CONFIG_CLASSES: tuple[type[Any], ...] = (
    BrokerConfig, TextEngineConfig, ImageEngineConfig, ClientConfig, GatewayConfig,
)


def env_name(cls: type[Any], name: str) -> str:
    """Environment variable that sets field ``name`` of config class ``cls``."""
    return f"ZEMBED_{cls.section.upper()}_{name.upper()}"


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML or environment value to the field's declared type, or raise ValueError."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"{where}: expected a boolean, got {value!r}")
    if typing.get_origin(typ) is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(i).strip() for i in items if str(i).strip())
    try:
        return typ(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: expected {typ.__name__}, got {value!r}") from exc


def read_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read a TOML config file; ``None`` or an empty path means no file."""
    if not path:
        return {}
    with Path(path).open("rb") as fh:
        return tomllib.load(fh)


def load(
    cls: type[T],
    *,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from defaults < file section < environment < flags (``None`` flags ignored).

    Unknown keys in the file section are an error, so a typo never silently does nothing.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get("ZEMBED_CONFIG")
    section = read_file(config_file).get(cls.section, {})  # type: ignore[attr-defined]
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(section) - names
    if unknown:
        raise ValueError(f"[{cls.section}] in {config_file}: unknown keys {sorted(unknown)}")  # type: ignore[attr-defined]
    values: dict[str, Any] = {}
    for name in names:
        where = f"{cls.section}.{name}"  # type: ignore[attr-defined]
        if name in section:
            values[name] = coerce(section[name], hints[name], where)
        if env_name(cls, name) in env:
            values[name] = coerce(env[env_name(cls, name)], hints[name], env_name(cls, name))
        if flags and flags.get(name) is not None:
            values[name] = coerce(flags[name], hints[name], f"--{name.replace('_', '-')}")
    return cls(**values)


def reference_markdown() -> str:
    """Render every option of every process as Markdown (kept in ``docs/configuration.md``)."""
    lines: list[str] = []
    for cls in CONFIG_CLASSES:
        lines += [f"### `[{cls.section}]` — {cls.__doc__}", ""]
        lines += ["| option | flag | environment | default | meaning |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(default)
            flag = "--" + f.name.replace("_", "-")
            lines.append(
                f"| `{f.name}` | `{flag}` | `{env_name(cls, f.name)}` | `{default!s}` "
                f"| {f.metadata['help']} |"
            )
        lines.append("")
    return "\n".join(lines)

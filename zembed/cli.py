"""The ``zembed`` command: parses options and delegates; no logic of its own.

Exit codes fit container probes: 0 success, 1 the broker answered "no" or not at all,
2 usage errors (click's own).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from zembed import __version__, extras
from zembed import config as cfgmod
from zembed import protocol as p
from zembed.clioptions import config_file_option, config_options


# A command that needs an extra not installed (`zembed start text` without torch) stops with
# one line naming it: see zembed/extras.py.
@click.group(cls=extras.Group)
@click.version_option(__version__, prog_name="zembed")
def main() -> None:
    """zembed: a ZeroMQ broker serving text and image embeddings."""


# -- start ---------------------------------------------------------------------------------


@main.group()
def start() -> None:
    """Run one zembed process in the foreground (broker or an engine)."""


@start.command("broker")
@config_file_option
@config_options(cfgmod.BrokerConfig)
def start_broker(config_file: str | None, **flags: Any) -> None:
    """Run the broker: clients on --frontend, engines on --backend."""
    from zembed import logs
    from zembed.broker.adaptive import parse_targets
    from zembed.broker.server import serve
    from zembed.security import CurveKeyError

    cfg = cfgmod.load(cfgmod.BrokerConfig, config_file=config_file, flags=flags)
    try:
        parse_targets(cfg.latency_target_ms, cfg.lanes)
    except ValueError as exc:
        raise click.ClickException(f"--latency-target-ms: {exc}") from None
    logs.setup(cfg.log_level, "broker")
    try:
        serve(cfg)
    except CurveKeyError as exc:
        raise click.ClickException(str(exc)) from None


@start.command("text")
@config_file_option
@config_options(cfgmod.TextEngineConfig)
def start_text(config_file: str | None, **flags: Any) -> None:
    """Run a text engine (sentence-embedding transformer) for the broker at --broker."""
    from zembed import logs
    from zembed.engines.launch import serve_text
    from zembed.engines.stpipeline import UnsupportedPipeline
    from zembed.engines.text import ModelUnavailable
    from zembed.security import CurveKeyError

    cfg = cfgmod.load(cfgmod.TextEngineConfig, config_file=config_file, flags=flags)
    logs.setup(cfg.log_level, "text")
    try:
        serve_text(cfg)
    except (CurveKeyError, UnsupportedPipeline, ModelUnavailable) as exc:
        raise click.ClickException(str(exc)) from None


@start.command("image")
@config_file_option
@config_options(cfgmod.ImageEngineConfig)
def start_image(config_file: str | None, **flags: Any) -> None:
    """Run an image engine (open_clip: images and CLIP text) for the broker at --broker."""
    from zembed import logs
    from zembed.engines.gpudecode import DecodeUnavailable
    from zembed.engines.image import WeightsUnavailable
    from zembed.engines.launch import serve_image
    from zembed.security import CurveKeyError

    cfg = cfgmod.load(cfgmod.ImageEngineConfig, config_file=config_file, flags=flags)
    logs.setup(cfg.log_level, "image")
    try:
        serve_image(cfg)
    except (WeightsUnavailable, DecodeUnavailable, CurveKeyError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to write NAME.key (public) and NAME.key_secret (private).")
def keygen(name: str, directory: str) -> None:
    """Make a CurveZMQ key pair for a broker, an engine or a client.

    Give the broker its .key_secret (--curve-secret-key) and every peer the broker's .key
    (--curve-server-key); copy each allowed client's or engine's .key into the broker's
    --curve-clients-dir or --curve-engines-dir.
    """
    from zembed.security import CurveKeyError
    from zembed.security import keygen as make_keys

    try:
        public, secret = make_keys(directory, name)
    except CurveKeyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"public key: {public}\nsecret key: {secret} (mode 600; keep it private)")


# -- up ------------------------------------------------------------------------------------


@main.command()
@config_file_option
@click.option("--demo", is_flag=True, help="Once ready, embed a few sentences, print, and exit.")
@click.option("--ready-timeout", default=180.0, show_default=True, help="Seconds to wait for ready.")
@click.option("--gateway", "with_gateway", is_flag=True,
              help="Also run the HTTP gateway (its [gateway] settings; needs zembed[gateway]).")
def up(config_file: str | None, demo: bool, ready_timeout: float, with_gateway: bool) -> None:
    """Broker and engines in one supervised command; Ctrl-C stops everything cleanly."""
    from zembed.supervisor import run_up

    sys.exit(run_up(config_file, demo=demo, ready_timeout_s=ready_timeout,
                    gateway=with_gateway))


# -- client commands -----------------------------------------------------------------------


def _client(config_file: str | None, flags: dict[str, Any]) -> Any:
    from zembed.client import Client

    cfg = cfgmod.load(cfgmod.ClientConfig, config_file=config_file, flags=flags)
    return Client(cfg.endpoint, timeout=cfg.timeout_s, curve_secret_key=cfg.curve_secret_key,
                  curve_server_key=cfg.curve_server_key, heartbeat_ms=cfg.heartbeat_ms)


@main.group()
def embed() -> None:
    """Embed inputs through the broker and print the vectors."""


def _embed_options(func: Any) -> Any:
    for opt in (
        click.option("--normalize/--no-normalize", default=True, show_default=True),
        click.option("--dimensions", type=click.IntRange(min=1), default=None,
                     help="Matryoshka truncation: the first N values of each vector "
                          "(renormalised with --normalize), where the lane's engines allow it "
                          "(zembed info: dimensions). Default: the model's full dim."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per input."),
        click.option("--file", "file", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="Embed every line of this file (row i = line i+1), "
                     "in requests sized from the broker's limits, many in flight."),
        click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
                     help="With --file: write the vectors to this .npy instead of printing."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="With --file: items per request (default: from the broker's info)."),
        click.option("--progress/--no-progress", default=None,
                     help="With --file: a progress bar on stderr (default: when stderr is a "
                          "terminal and tqdm is installed)."),
        config_file_option,
        config_options(cfgmod.ClientConfig),
    ):
        func = opt(func)
    return func


def _embed_and_print(lane: str, kind: str, labels: tuple[str, ...], items: list[Any],
                     as_json: bool, config_file: str | None, flags: dict[str, Any],
                     **kw: Any) -> None:
    """Embed ``items``, print one line (or JSON object) per input; errors exit 1."""
    from zembed.errors import ZembedError

    with _client(config_file, flags) as client:
        try:
            result = client.embed(lane, kind, items, **kw)
        except ZembedError as exc:
            raise click.ClickException(f"{type(exc).__name__} ({exc.status}): {exc}") from None
    for i, (label, vec) in enumerate(zip(labels, result.vectors, strict=True)):
        error = result.item_errors.get(i)
        if as_json:
            row: dict[str, Any] = {"input": label, "dim": len(vec)}
            row.update({"error": list(error)} if error else {"vector": vec.tolist()})
            click.echo(json.dumps(row))
        elif error:
            click.echo(f"{label}\terror {error[0]}: {error[1]}")
        else:
            click.echo(f"{label}\t" + " ".join(f"{x:.6g}" for x in vec))


def _embed_command(kind: str, args: tuple[str, ...], opts: dict[str, Any], **kw: Any) -> None:
    """``zembed embed KIND``: the arguments, or every line of --file (exit 1 if any failed)."""
    file, out = opts.pop("file"), opts.pop("out")
    batch_size, progress = opts.pop("batch_size"), opts.pop("progress")
    as_json, config_file = opts.pop("as_json"), opts.pop("config_file")
    kw["dimensions"] = opts.pop("dimensions")
    if bool(file) == bool(args):
        raise click.UsageError("give inputs as arguments or --file, not both (nor neither)")
    if out and not file:
        raise click.UsageError("--out needs --file")
    if not file:
        lane = p.LANE_TEXT if kind == p.KIND_TEXT else p.LANE_IMAGE
        items: list[Any] = list(args)
        if kind == p.KIND_IMAGE:
            from zembed.client.images import image_items

            try:
                items = list(image_items(items))
            except OSError as exc:
                raise click.ClickException(str(exc)) from None
        _embed_and_print(lane, kind, args, items, as_json, config_file, opts, **kw)
        return
    _embed_file(kind, file, out, batch_size, progress, as_json, config_file, opts, **kw)


def _embed_file(kind: str, file: str, out: str | None, batch_size: int | None,
                progress: bool | None, as_json: bool, config_file: str | None,
                flags: dict[str, Any], **kw: Any) -> None:
    from pathlib import Path

    from zembed.errors import ZembedError
    from zembed.tools.embedfile import embed_file

    if progress is None:
        import importlib.util

        progress = sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None
    with _client(config_file, flags) as client:
        try:
            summary = embed_file(client, Path(file), kind, out=Path(out) if out else None,
                                 batch_size=batch_size, progress=progress, as_json=as_json,
                                 echo=click.echo, **kw)
        except ZembedError as exc:
            raise click.ClickException(f"{type(exc).__name__} ({exc.status}): {exc}") from None
    click.echo(json.dumps(summary), err=True)
    if summary["failed"]:
        sys.exit(1)


@embed.command("text")
@click.argument("texts", nargs=-1)
@click.option("--input-type", default=None, metavar="NAME",
              help="The prompt to apply: query, document, or another of the model's prompts "
                   "(zembed info lists the lane's prompts).")
@_embed_options
def embed_text(texts: tuple[str, ...], normalize: bool, input_type: str | None,
               **opts: Any) -> None:
    """Embed TEXTS (or every line of --file) on the text lane."""
    _embed_command(p.KIND_TEXT, texts, opts, normalize=normalize, input_type=input_type)


@embed.command("image")
@click.argument("paths", nargs=-1)
@_embed_options
def embed_image(paths: tuple[str, ...], normalize: bool, **opts: Any) -> None:
    """Embed image files (or data:/http(s) URIs) PATHS, or those listed in --file, on the
    image lane."""
    _embed_command(p.KIND_IMAGE, paths, opts, normalize=normalize)


@embed.command("clip-text")
@click.argument("texts", nargs=-1)
@_embed_options
def embed_clip_text(texts: tuple[str, ...], normalize: bool, **opts: Any) -> None:
    """Embed TEXTS (or every line of --file) with the CLIP text tower of the image lane (to
    search images)."""
    _embed_command(p.KIND_CLIP_TEXT, texts, opts, normalize=normalize)


def _probe(op: str, config_file: str | None, flags: dict[str, Any]) -> None:
    from zembed.errors import ZembedError

    with _client(config_file, flags) as client:
        try:
            answer = getattr(client, op)()
        except ZembedError as exc:
            click.echo(f"{op}: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)
    click.echo(json.dumps(answer, sort_keys=True))
    if op == "ready" and not answer.get("ready"):
        click.echo(answer.get("error", "not ready"), err=True)
        sys.exit(1)


for _op, _help in (("ping", "Round trip to the broker (exit 1 if no answer)."),
                   ("health", "Liveness probe: exit 1 if the broker loop does not answer within "
                              "--timeout-s (a stuck loop answers nobody)."),
                   ("ready", "Readiness probe: every lane has a live, warm engine that answered its "
                             "last heartbeat, and the cache is reachable or off (exit 1 if not, "
                             "naming what is missing)."),
                   ("info", "The broker's request limits and, per lane, kinds, model, "
                            "fingerprints, dim, credits, the largest request it takes now, "
                            "whether it allows dimensions, and its prompts.")):

    def _make(op: str) -> Any:
        @config_file_option
        @config_options(cfgmod.ClientConfig)
        def command(config_file: str | None, **flags: Any) -> None:
            _probe(op, config_file, flags)

        return command

    main.command(_op, help=_help)(_make(_op))


_poll_option = click.option(
    "--poll", is_flag=True,
    help="Ask the frontend (--endpoint) with the stats op each second instead of subscribing "
         "to --stats-endpoint (for hosts that cannot reach the loopback stats socket).")


def _stats_source(config_file: str | None, flags: dict[str, Any], poll: bool) -> Any:
    from zembed.tools.statsource import open_source

    cfg = cfgmod.load(cfgmod.ClientConfig, config_file=config_file, flags=flags)
    return cfg, open_source(cfg.stats_endpoint, cfg.endpoint, poll=poll,
                            curve_secret_key=cfg.curve_secret_key,
                            curve_server_key=cfg.curve_server_key)


def _export(config_file: str | None, flags: dict[str, Any], poll: bool, port: int,
            addr: str) -> None:
    import signal
    import threading

    from zembed.tools import exporter

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _, source = _stats_source(config_file, flags, poll)
    click.echo(f"zembed exporter: http://{addr}:{port}/metrics from {source.where}", err=True)
    try:
        exporter.serve(source, port, addr, stop)
    finally:
        source.close()


@main.command()
@click.option("--once", is_flag=True, help="Print one snapshot and exit (1 if none came).")
@click.option("--json", "as_json", is_flag=True,
              help="JSON instead of the table: one object per snapshot, one per line.")
@click.option("--prometheus-port", type=int, default=None,
              help="Serve a Prometheus exporter on this port instead (like `zembed exporter`).")
@click.option("--prometheus-addr", default="127.0.0.1", show_default=True,
              help="Address the exporter binds (0.0.0.0 to be scraped from elsewhere).")
@_poll_option
@config_file_option
@config_options(cfgmod.ClientConfig)
def stats(once: bool, as_json: bool, prometheus_port: int | None, prometheus_addr: str,
          poll: bool, config_file: str | None, **flags: Any) -> None:
    """Live dashboard of the broker's stats socket: per-lane rates, latencies, credits, cache."""
    from zembed.tools import dashboard

    if prometheus_port is not None:
        _export(config_file, flags, poll, prometheus_port, prometheus_addr)
        return
    cfg, source = _stats_source(config_file, flags, poll)
    try:
        if not (once or as_json):
            sys.exit(dashboard.run(source))
        while True:
            snap = source.next(timeout_s=cfg.timeout_s)
            if snap is None:
                click.echo(f"stats: no snapshot from {source.where} within {cfg.timeout_s} s "
                           "(broker down, or its stats socket off or elsewhere? try --poll)",
                           err=True)
                sys.exit(1)
            if as_json:
                click.echo(json.dumps(snap, sort_keys=True))
            else:
                click.echo("\n".join(dashboard.Dashboard(source.where).frame(snap)))
            if once:
                return
    except KeyboardInterrupt:
        pass
    finally:
        source.close()


@main.command()
@click.option("--port", default=9108, show_default=True, help="Port of /metrics.")
@click.option("--addr", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 to be scraped from elsewhere).")
@_poll_option
@config_file_option
@config_options(cfgmod.ClientConfig)
def exporter(port: int, addr: str, poll: bool, config_file: str | None, **flags: Any) -> None:
    """Prometheus exporter: the broker's stats snapshots on http://ADDR:PORT/metrics."""
    _export(config_file, flags, poll, port, addr)


@main.command()
@config_file_option
@config_options(cfgmod.GatewayConfig)
def gateway(config_file: str | None, **flags: Any) -> None:
    """HTTP gateway: OpenAI /v1/embeddings and TEI /embed in front of the broker (docs/http.md)."""
    from zembed import logs
    from zembed.gateway.serve import GatewayConfigError, serve

    cfg = cfgmod.load(cfgmod.GatewayConfig, config_file=config_file, flags=flags)
    logs.setup(cfg.log_level, "gateway")
    try:
        serve(cfg)
    except GatewayConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--kind", type=click.Choice(["text", "clip-text", "image", "mix"]), default="text",
              show_default=True, help="mix = text and image interleaved.")
@click.option("--items", default=1, show_default=True, help="Items per request.")
@click.option("--concurrency", default=8, show_default=True, help="Closed loop: workers.")
@click.option("--window", default=1, show_default=True,
              help="Closed loop: requests each worker keeps in flight.")
@click.option("--rate", default=0.0, show_default=True,
              help="Open loop: requests/s at a fixed rate (0 = closed loop).")
@click.option("--duration-s", default=10.0, show_default=True, help="Stop after this long, s.")
@click.option("--requests", default=1_000_000, show_default=True, help="...or this many.")
@click.option("--repeat", default=0.0, show_default=True,
              help="Share of items repeated from a small pool (exercises the cache), 0..1.")
@click.option("--priority", type=click.Choice(["interactive", "bulk"]), default=None,
              help="The requests' class (default: the broker's, interactive).")
@click.option("--raw", is_flag=True, help="Also measure this machine's raw limits, same run.")
@click.option("--http", "http_url", default=None, metavar="URL",
              help="Load the HTTP gateway at URL (http://HOST:PORT; path /v1/embeddings unless "
                   "given) instead of the broker. Text kinds only; --raw still asks --endpoint's "
                   "broker which model to measure.")
@click.option("--model", default="text", show_default=True,
              help="--http: the request's model (clip-text is sent to model image unless "
                   "another is named).")
@click.option("--encoding", type=click.Choice(["float", "base64"]), default="base64",
              show_default=True, help="--http: encoding_format asked for.")
@click.option("--api-key", default="", envvar="ZEMBED_API_KEY", metavar="KEY",
              help="--http: sent as Authorization: Bearer KEY (env ZEMBED_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_file_option
@config_options(cfgmod.ClientConfig)
def bench(kind: str, items: int, concurrency: int, window: int, rate: float, duration_s: float,
          requests: int, repeat: float, priority: str | None, raw: bool,
          http_url: str | None, model: str,
          encoding: str, api_key: str, as_json: bool, config_file: str | None,
          **flags: Any) -> None:
    """Load the broker and report throughput, latency, rejections and cache hits.

    With --http URL the same load goes through the HTTP gateway (OpenAI /v1/embeddings, raw
    HTTP/1.1 on one keep-alive connection per request in flight) and the same report comes
    back: 429s counted as rejected (a closed loop waits retry-after-ms), other HTTP statuses
    as errors, 0 for no answer within the timeout.
    """
    from zembed.tools import bench as benchmod

    kinds = ("text", "image") if kind == "mix" else (kind,)
    spec = benchmod.BenchSpec(kinds=kinds, items=items, concurrency=concurrency, window=window,
                              rate=rate, duration_s=duration_s, requests=requests,
                              repeat=repeat, priority=priority)
    ccfg = cfgmod.load(cfgmod.ClientConfig, config_file=config_file, flags=flags)
    load = None
    if http_url:
        from zembed.tools.httpbench import HttpBench

        if "image" in kinds:
            raise click.UsageError(f"--kind {kind} cannot be sent with --http: images are not "
                                   "measured over HTTP; use --kind text or clip-text")
        try:
            load = HttpBench(http_url, spec, not as_json, model=model, encoding=encoding,
                             api_key=api_key).run
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    result = benchmod.run(ccfg.endpoint, spec, raw=raw, config_file=config_file,
                          progress=not as_json,
                          curve=(ccfg.curve_secret_key, ccfg.curve_server_key),
                          load=load, via=http_url or "")
    click.echo(json.dumps(result, indent=2) if as_json else benchmod.render(result))


@main.command()
@click.option("--minutes", default=10.0, show_default=True, help="How long load is sent.")
@click.option("--rate", default=40.0, show_default=True, help="Requests/s, all kinds, open loop.")
@click.option("--image-args", default="--random-weights", show_default=True,
              help="`zembed start image` arguments; '' for a text-only soak.")
@click.option("--fault-every-s", default=20.0, show_default=True,
              help="Seconds between faults (text kill, image kill, Redis kill, in turn).")
@click.option("--down-s", default=2.0, show_default=True, help="Seconds a killed process stays down.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def soak(minutes: float, rate: float, image_args: str, fault_every_s: float, down_s: float,
         as_json: bool) -> None:
    """Mixed load on a private stack while engines and Redis are killed; exit 1 unless every
    request was answered exactly once."""
    from zembed.tools import soak as soakmod

    spec = soakmod.SoakSpec(seconds=minutes * 60, rate=rate, image_args=image_args,
                            fault_every_s=fault_every_s, down_s=down_s)
    report = soakmod.Soak(spec, progress=not as_json).run()
    click.echo(json.dumps(report, indent=2) if as_json else soakmod.render(report))
    if not report["ok_sent_equals_answered"]:
        sys.exit(1)


@main.group()
def cache() -> None:
    """Inspect, purge and warm the embedding cache."""


def _redis_url(config_file: str | None, redis_url: str | None) -> str:
    if redis_url:
        return redis_url
    spec = cfgmod.load(cfgmod.BrokerConfig, config_file=config_file).cache
    if spec.startswith(("redis://", "rediss://", "unix://", "redis+cluster://",
                        "rediss+cluster://")):
        return spec
    if spec == "auto":
        return "redis://127.0.0.1:6379/0"
    raise click.ClickException(f"the broker's cache is {spec!r}, not Redis; give --redis URL")


_redis_option = click.option("--redis", "redis_url", default=None,
                             help="Redis URL, or redis+cluster://seeds for every master of a "
                                  "cluster (default: the broker config's cache).")
_prefix_option = click.option("--prefix", default=None, help="Key prefix (default: config's).")


@cache.command("stats")
@_redis_option
@_prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_file_option
@config_options(cfgmod.ClientConfig)
def cache_stats(redis_url: str | None, prefix: str | None, as_json: bool,
                config_file: str | None, **flags: Any) -> None:
    """Hits, misses and hit ratio per kind (from the broker); keys and memory (from Redis)."""
    from zembed.errors import ZembedError
    from zembed.tools import cachetool

    out: dict[str, Any] = {}
    with _client(config_file, flags) as client:
        try:
            out["broker"] = cachetool.broker_cache_stats(client.stats())
        except ZembedError as exc:
            out["broker"] = {"error": f"{type(exc).__name__}: {exc}"}
    prefix = prefix or cfgmod.load(cfgmod.BrokerConfig, config_file=config_file).cache_prefix
    try:
        out["redis"] = cachetool.redis_usage(
            cachetool.redis_clients(_redis_url(config_file, redis_url)), prefix)
    except ModuleNotFoundError as exc:  # a client-only install: the broker's half still works
        if (exc.name or "").split(".")[0] != "redis":
            raise
        out["redis"] = {"error": "needs zembed[broker]: pip install 'zembed[broker]'"}
    except Exception as exc:  # no Redis is a fact to report, not a crash
        out["redis"] = {"error": f"{type(exc).__name__}: {exc}"}
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    backend = out["broker"].get("backend", {})
    click.echo(f"broker cache: {json.dumps(backend, sort_keys=True)}")
    for kind, row in sorted(out["broker"].get("kinds", {}).items()):
        click.echo(f"  {kind:10} hits {row['hits']:>10}  misses {row['misses']:>10}  "
                   f"hit ratio {row['hit_ratio']}")
    redis = out["redis"]
    if "error" in redis:
        click.echo(f"redis: {redis['error']}")
        return
    click.echo(f"redis: {redis['keys']} keys, ~{redis['bytes_estimate']} bytes under "
               f"{prefix!r}; used_memory {redis['redis_used_memory']}, maxmemory "
               f"{redis['redis_maxmemory']} ({redis['redis_maxmemory_policy']})")
    for g in redis["groups"]:
        click.echo(f"  {g['kind']:10} {g['fingerprint']:32} {g['keys']:>10} keys "
                   f"~{g['bytes_estimate']} bytes")


@cache.command("purge")
@click.option("--kind", type=click.Choice(sorted(p.TEXT_KINDS | {p.KIND_IMAGE})), default=None)
@click.option("--model", "fingerprint", default=None, help="Model fingerprint (see stats).")
@click.option("--all", "purge_all", is_flag=True, help="Every zembed key under the prefix.")
@_redis_option
@_prefix_option
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              envvar="ZEMBED_CONFIG", default=None, help="TOML config file.")
def cache_purge(kind: str | None, fingerprint: str | None, purge_all: bool,
                redis_url: str | None, prefix: str | None, config_file: str | None) -> None:
    """Delete cached vectors by kind and/or model fingerprint (SCAN + UNLINK)."""
    from zembed.tools import cachetool

    if not (kind or fingerprint or purge_all):
        raise click.UsageError("say what to purge: --kind, --model, or --all")
    prefix = prefix or cfgmod.load(cfgmod.BrokerConfig, config_file=config_file).cache_prefix
    clients = cachetool.redis_clients(_redis_url(config_file, redis_url))
    click.echo(f"deleted {cachetool.purge(clients, prefix, kind, fingerprint)} key(s)")


@cache.command("warm")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--kind", type=click.Choice(sorted(p.TEXT_KINDS | {p.KIND_IMAGE})),
              default=p.KIND_TEXT, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Items per request (default: from the broker's info).")
@click.option("--normalize/--no-normalize", default=True, show_default=True)
@click.option("--input-type", default=None, metavar="NAME",
              help="Warm the entries of this prompt (query, document or another of the "
                   "model's prompts): each prompt has entries of its own.")
@click.option("--dimensions", type=click.IntRange(min=1), default=None,
              help="Warm the entries truncated to N dimensions (each width has entries of "
                   "its own).")
@config_file_option
@config_options(cfgmod.ClientConfig)
def cache_warm(file: str, kind: str, batch: int | None, normalize: bool,
               input_type: str | None, dimensions: int | None, config_file: str | None,
               **flags: Any) -> None:
    """Embed every non-blank line of FILE (texts, or image paths for --kind image) so it is
    cached; a busy lane only slows it down."""
    from pathlib import Path

    from zembed.errors import ZembedError
    from zembed.tools import cachetool

    with _client(config_file, flags) as client:
        try:
            out = cachetool.warm(client, cachetool.read_inputs(Path(file)), kind, batch,
                                 normalize=normalize, input_type=input_type,
                                 dimensions=dimensions)
        except ZembedError as exc:
            raise click.ClickException(f"{type(exc).__name__} ({exc.status}): {exc}") from None
    click.echo(json.dumps(out))


@main.group()
def config() -> None:
    """Inspect configuration."""


@config.command("show")
@click.argument("process", type=click.Choice([c.section for c in cfgmod.CONFIG_CLASSES]))
@config_file_option
def config_show(process: str, config_file: str | None) -> None:
    """Print the effective config of PROCESS (file < environment) as TOML-ish lines."""
    cls = next(c for c in cfgmod.CONFIG_CLASSES if c.section == process)
    cfg = cfgmod.load(cls, config_file=config_file)
    click.echo(f"[{process}]")
    for key, value in vars(cfg).items():
        click.echo(f"{key} = {json.dumps(list(value) if isinstance(value, tuple) else value)}")


@config.command("reference")
def config_reference() -> None:
    """Print every option of every process as Markdown."""
    click.echo(cfgmod.reference_markdown())

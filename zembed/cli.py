"""The ``zembed`` command: parses options and delegates; no logic of its own.

Exit codes fit container probes: 0 success, 1 the broker answered "no" or not at all,
2 usage errors (click's own).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from zembed import __version__
from zembed import config as cfgmod
from zembed.clioptions import config_file_option, config_options


@click.group()
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
    from zembed.broker.server import serve

    cfg = cfgmod.load(cfgmod.BrokerConfig, config_file=config_file, flags=flags)
    logs.setup(cfg.log_level, "broker")
    serve(cfg)


@start.command("text")
@config_file_option
@config_options(cfgmod.TextEngineConfig)
def start_text(config_file: str | None, **flags: Any) -> None:
    """Run a text engine (sentence-embedding transformer) for the broker at --broker."""
    from zembed import logs
    from zembed.engines.launch import serve_text

    cfg = cfgmod.load(cfgmod.TextEngineConfig, config_file=config_file, flags=flags)
    logs.setup(cfg.log_level, "text")
    serve_text(cfg)


@start.command("image", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def start_image(args: tuple[str, ...]) -> None:
    """Run an image engine (open_clip) -- not built yet."""
    raise click.ClickException("the image engine is not built yet (it lands with the image lane)")


# -- up ------------------------------------------------------------------------------------


@main.command()
@config_file_option
@click.option("--demo", is_flag=True, help="Once ready, embed a few sentences, print, and exit.")
@click.option("--ready-timeout", default=180.0, show_default=True, help="Seconds to wait for ready.")
def up(config_file: str | None, demo: bool, ready_timeout: float) -> None:
    """Broker and engines in one supervised command; Ctrl-C stops everything cleanly."""
    from zembed.supervisor import run_up

    sys.exit(run_up(config_file, demo=demo, ready_timeout_s=ready_timeout))


# -- client commands -----------------------------------------------------------------------


def _client(config_file: str | None, flags: dict[str, Any]) -> Any:
    from zembed.client import Client

    cfg = cfgmod.load(cfgmod.ClientConfig, config_file=config_file, flags=flags)
    return Client(cfg.endpoint, timeout=cfg.timeout_s)


@main.group()
def embed() -> None:
    """Embed inputs through the broker and print the vectors."""


@embed.command("text")
@click.argument("texts", nargs=-1, required=True)
@click.option("--normalize/--no-normalize", default=True, show_default=True)
@click.option("--input-type", type=click.Choice(["query", "document"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per input.")
@config_file_option
@config_options(cfgmod.ClientConfig)
def embed_text(texts: tuple[str, ...], normalize: bool, input_type: str | None, as_json: bool,
               config_file: str | None, **flags: Any) -> None:
    """Embed TEXTS on the text lane."""
    from zembed.errors import ZembedError

    with _client(config_file, flags) as client:
        try:
            vectors = client.embed_texts(list(texts), normalize=normalize, input_type=input_type)
        except ZembedError as exc:
            raise click.ClickException(f"{type(exc).__name__} ({exc.status}): {exc}") from None
    for text, vec in zip(texts, vectors, strict=True):
        if as_json:
            click.echo(json.dumps({"text": text, "dim": len(vec), "vector": vec.tolist()}))
        else:
            click.echo(f"{text}\t" + " ".join(f"{x:.6g}" for x in vec))


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
        sys.exit(1)


for _op, _help in (("ping", "Round trip to the broker (exit 1 if no answer)."),
                   ("health", "Broker liveness probe (exit 1 if the loop does not answer)."),
                   ("ready", "Readiness probe: every lane has a live, warm engine (exit 1 if not)."),
                   ("stats", "Print a snapshot of the broker's counters as JSON.")):

    def _make(op: str) -> Any:
        @config_file_option
        @config_options(cfgmod.ClientConfig)
        def command(config_file: str | None, **flags: Any) -> None:
            _probe(op, config_file, flags)

        return command

    main.command(_op, help=_help)(_make(_op))


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

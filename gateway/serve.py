"""``zembed gateway``: check the configuration, then run uvicorn with the gateway app.

uvicorn with uvloop and httptools was chosen by measurement over granian (benchmarks/README.md,
*HTTP stack for the gateway*). Each of ``--workers`` processes builds its own app, so its own
broker connection, from the configuration handed over in the environment.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import tempfile

from zembed.config import GatewayConfig
from zembed.gateway.app import CONFIG_ENV, METRICS_DIR_ENV, config_to_env
from zembed.gateway.auth import read_keys
from zembed.gateway.models import parse_aliases

log = logging.getLogger("zembed.gateway")


class GatewayConfigError(ValueError):
    """A configuration the gateway refuses to start with (one line for the user)."""


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise GatewayConfigError(f"--listen {listen!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(cfg: GatewayConfig) -> tuple[str, int]:
    """Everything that would make the gateway useless or unsafe, before any worker starts."""
    host, port = split_listen(cfg.listen)
    try:
        parse_aliases(cfg.model_aliases)
    except ValueError as exc:
        raise GatewayConfigError(str(exc)) from None
    if cfg.workers < 1:
        raise GatewayConfigError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.api_keys_file:
        try:
            read_keys(cfg.api_keys_file)
        except (OSError, ValueError) as exc:
            raise GatewayConfigError(f"--api-keys-file: {exc}") from None
    elif not is_loopback(host) and not cfg.insecure_no_auth:
        raise GatewayConfigError(
            f"--listen {cfg.listen} is not a loopback address and no --api-keys-file is given: "
            "anyone who reaches it could spend model time. Give --api-keys-file, or "
            "--insecure-no-auth when a proxy in front authenticates (docs/security.md)")
    if bool(cfg.tls_certfile) != bool(cfg.tls_keyfile):
        raise GatewayConfigError("--tls-certfile and --tls-keyfile go together")
    return host, port


def serve(cfg: GatewayConfig) -> None:
    """Run the gateway in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    host, port = check(cfg)
    os.environ[CONFIG_ENV] = config_to_env(cfg)
    share = tempfile.mkdtemp(prefix="zembed-gateway-metrics-")
    os.environ[METRICS_DIR_ENV] = share
    log.info("gateway on %s://%s:%d, %d worker(s), broker %s, keys %s", "https" if
             cfg.tls_certfile else "http", host, port, cfg.workers, cfg.broker,
             cfg.api_keys_file or "off")
    try:
        uvicorn.run("zembed.gateway.app:create_app", factory=True, host=host, port=port,
                    workers=cfg.workers, loop="uvloop", http="httptools", lifespan="on",
                    access_log=cfg.access_log, log_level=cfg.log_level.lower(),
                    ssl_certfile=cfg.tls_certfile or None,
                    ssl_keyfile=cfg.tls_keyfile or None, server_header=False,
                    proxy_headers=False)
    finally:
        shutil.rmtree(share, ignore_errors=True)

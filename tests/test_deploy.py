"""Deployment files (issue 16): Kubernetes manifests validated against the API schemas, systemd
units verified by systemd itself, and every zembed command in them parsed by the real CLI."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from zembed import config
from zembed.cli import main as cli

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
#: The Kubernetes version the manifests are checked against (kubernetes-validate's schemas).
K8S_VERSION = "1.30"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return docs


def parse_cli(argv: list[str]) -> click.Context:
    """Parse ``zembed ...`` exactly as the CLI would, down to the subcommand, without running
    it: an unknown command or option raises click's UsageError."""
    assert argv[0] == "zembed", argv
    ctx = cli.make_context("zembed", argv[1:], resilient_parsing=False)
    command: click.Command = cli
    args = rest_of(ctx)
    while isinstance(command, click.Group) and args:
        name, sub, rest = command.resolve_command(ctx, args)
        assert sub is not None, argv
        ctx = sub.make_context(name or "", rest, parent=ctx)
        command, args = sub, rest_of(ctx)
    return ctx


def rest_of(ctx: click.Context) -> list[str]:
    """A group context's subcommand and its arguments (click 8.2 keeps the subcommand's name
    apart, in an attribute whose public name is deprecated)."""
    fields = vars(ctx)
    return [*fields.get("_protected_args", fields.get("protected_args", [])), *ctx.args]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", []))


def test_manifests_are_valid_kubernetes_objects() -> None:
    import kubernetes_validate

    docs = manifests()
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["ConfigMap", "Deployment", "Service", "StatefulSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error


def test_a_broken_manifest_is_caught() -> None:
    """The validation above can fail: a misspelled field is an error in strict mode."""
    import kubernetes_validate

    broker = next(d for d in manifests() if d["kind"] == "StatefulSet")
    broker["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broker, K8S_VERSION, strict=True)


def test_every_zembed_command_in_the_manifests_parses_and_probes_use_ready_and_health() -> None:
    probes: dict[str, set[str]] = {}
    for doc in manifests():
        for c in containers(doc):
            if c["command"][0] == "zembed":
                parse_cli(c["command"])
            for kind in ("livenessProbe", "readinessProbe"):
                command = c.get(kind, {}).get("exec", {}).get("command")
                if command and command[0] == "zembed":
                    parse_cli(command)
                    probes.setdefault(c["name"], set()).add(f"{kind}:{command[1]}")
            if c["name"] != "gateway":
                assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert probes["broker"] == {"livenessProbe:health", "readinessProbe:ready"}
    # Clients and engines list every broker of the StatefulSet (Freelance; credits split).
    cm = next(d for d in manifests() if d["kind"] == "ConfigMap")["data"]
    brokers = next(d for d in manifests() if d["kind"] == "StatefulSet")["spec"]["replicas"]
    for key in ("ZEMBED_CLIENT_ENDPOINT", "ZEMBED_GATEWAY_BROKER", "ENGINE_BROKERS"):
        assert len(cm[key].split(",")) == brokers
    assert cm["CACHE"].startswith("redis+cluster://")


def units() -> list[Path]:
    return sorted((DEPLOY / "systemd").glob("*.service"))


def verify(unit: Path, tmp_path: Path) -> list[str]:
    """``systemd-analyze verify`` of ``unit`` with ExecStart pointed at this checkout's zembed
    (verify checks that the program exists) and no User= (no such user here): its complaints."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is needed (apt install systemd)"
    zembed = Path(shutil.which("zembed") or Path(__file__).parent.parent / ".venv/bin/zembed")
    assert zembed.exists()
    text = unit.read_text(encoding="utf-8").replace("/opt/zembed/.venv/bin/zembed", str(zembed))
    name = unit.name.replace("@.", "@text.")
    (tmp_path / name).write_text(text.replace("User=zembed\n", "").replace("Group=zembed\n", ""),
                                 encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True,
                            text=True, timeout=60)
    complaints = [line for line in (result.stderr + result.stdout).splitlines()
                  if name in line or "error" in line.lower()]
    return complaints if complaints or result.returncode == 0 else [result.stderr]


def test_systemd_units_verify(tmp_path: Path) -> None:
    found = units()
    assert [u.name for u in found] == ["zembed-broker.service", "zembed-engine@.service",
                                       "zembed-gateway.service"]
    for unit in found:
        assert verify(unit, tmp_path) == [], unit.name


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "src" / "zembed-broker.service"
    broken.parent.mkdir()
    broken.write_text((DEPLOY / "systemd" / "zembed-broker.service").read_text(
        encoding="utf-8").replace("Restart=always", "Restrat=always"), encoding="utf-8")
    assert any("Restrat" in line for line in verify(broken, tmp_path))


def test_unit_commands_parse_and_the_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for unit in units():
        for line in unit.read_text(encoding="utf-8").splitlines():
            if line.startswith("ExecStart="):
                argv = shlex.split(line.removeprefix("ExecStart="))
                argv[0] = "zembed"
                for instance in ("text", "image"):
                    parse_cli([a.replace("%i", instance) for a in argv])
    example = DEPLOY / "systemd" / "zembed.toml"
    monkeypatch.delenv("ZEMBED_CONFIG", raising=False)
    broker = config.load(config.BrokerConfig, config_file=example, env={})
    assert broker.cache.startswith("redis+cluster://")
    text = config.load(config.TextEngineConfig, config_file=example, env={})
    assert len(text.broker.split(",")) == 3
    client = config.load(config.ClientConfig, config_file=example, env={})
    assert len(client.endpoint.split(",")) == 3

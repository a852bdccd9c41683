"""The soak, short: mixed load while engines and Redis are SIGKILLed; every request answered once."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from conftest import tiny_args

from zembed.tools.soak import Soak, SoakSpec, render


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_soak_answers_every_request_exactly_once(tiny: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    spec = SoakSpec(seconds=36, rate=25, image_args=shlex.join(tiny_args(tiny)),
                    fault_every_s=9, down_s=1.0, heartbeat_ms=300, timeout_s=8,
                    workdir=str(tmp_path))
    report = Soak(spec, progress=False).run()
    print(render(report))
    whats = [f["what"] for f in report["faults"]]
    assert {"SIGKILL text", "SIGKILL image", "SIGKILL redis"} <= set(whats)
    assert report["sent"] > 500
    assert report["sent"] == report["answered"], render(report)
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["late_replies"] == 0
    assert report["ok"] > report["sent"] // 2  # faults cost some requests, not the service
    assert report["ok_sent_equals_answered"]

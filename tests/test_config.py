"""Config precedence: defaults < TOML file < ZEMBED_* environment < flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from zembed import config


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "z.toml"
    f.write_text('[text]\ncredits = 10\nmax_batch = 8\nmodel = "from-file"\n')
    env = {"ZEMBED_TEXT_CREDITS": "20", "ZEMBED_TEXT_DEVICE": "cpu"}
    cfg = config.load(config.TextEngineConfig, config_file=f, env=env,
                      flags={"device": "cuda", "max_wait_ms": None})
    assert cfg.model == "from-file"  # file only
    assert cfg.max_batch == 8  # file
    assert cfg.credits == 20  # env beats file
    assert cfg.device == "cuda"  # flag beats env
    assert cfg.max_wait_ms == 0.0  # None flag = not given


def test_config_file_from_environment(tmp_path: Path) -> None:
    f = tmp_path / "z.toml"
    f.write_text('[broker]\nlanes = ["text", "image"]\n')
    cfg = config.load(config.BrokerConfig, env={"ZEMBED_CONFIG": str(f)})
    assert cfg.lanes == ("text", "image")


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "z.toml"
    f.write_text("[broker]\nmax_itmes = 3\n")
    with pytest.raises(ValueError, match="max_itmes"):
        config.load(config.BrokerConfig, config_file=f, env={})


def test_bad_value_names_its_source() -> None:
    with pytest.raises(ValueError, match="ZEMBED_BROKER_MAX_ITEMS"):
        config.load(config.BrokerConfig, env={"ZEMBED_BROKER_MAX_ITEMS": "many"})


def test_reference_covers_every_option() -> None:
    ref = config.reference_markdown()
    for cls in config.CONFIG_CLASSES:
        for fld in dataclasses.fields(cls):
            assert f"`{config.env_name(cls, fld.name)}`" in ref


def test_docs_reference_is_current() -> None:
    """docs/configuration.md must carry what `zembed config reference` prints today."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert config.reference_markdown().strip() in doc

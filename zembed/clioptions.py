"""Click options generated from the config dataclasses, so flags, env and docs never drift."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from zembed.config import env_name

F = TypeVar("F", bound=Callable[..., Any])

_CLICK_TYPES: dict[Any, Any] = {int: click.INT, float: click.FLOAT, str: click.STRING}


def config_options(cls: type[Any]) -> Callable[[F], F]:
    """Add one ``--field-name`` option per field of ``cls`` (default None = not given)."""
    hints = typing.get_type_hints(cls)

    def decorate(func: F) -> F:
        for fld in reversed(dataclasses.fields(cls)):
            flag = "--" + fld.name.replace("_", "-")
            default = fld.default
            if isinstance(default, tuple):
                default = ",".join(default)
            text = f"{fld.metadata['help']} [env {env_name(cls, fld.name)}; default {default!s}]"
            typ = hints[fld.name]
            if typ is bool:
                opt = click.option(f"{flag}/--no-{flag[2:]}", fld.name, default=None, help=text)
            else:
                opt = click.option(flag, fld.name, type=_CLICK_TYPES.get(typ, click.STRING),
                                   default=None, help=text)
            func = opt(func)
        return func

    return decorate


def config_file_option(func: F) -> F:
    """``--config FILE``: a TOML file with [broker], [text], [client] tables."""
    return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                        envvar="ZEMBED_CONFIG", default=None,
                        help="TOML config file (env ZEMBED_CONFIG).")(func)

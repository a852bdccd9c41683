"""Which lane and kind serve a request's ``model``, from the broker's ``info``.

OpenAI clients name a model, not a lane. Each lane answers to: the model name its engines
announced (``sentence-transformers/all-MiniLM-L6-v2``), that name's last path part
(``all-MiniLM-L6-v2``), the lane's own name (``text``), and the aliases the operator configured
(``text-embedding-3-small=text``), matched without regard to case. ``modality`` picks the
kind: text goes to a lane's text kind (``text``, or ``clip-text`` on the CLIP lane), images to
``image``. Names seen once are kept while the lane's engines are away (a broker restart), so a
known model is answered 503 (no engine yet), never 404.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zembed import protocol as p
from zembed.gateway.errors import HttpError

MODALITIES = ("text", "image")
#: For a text input, the kinds a lane may serve it with, in order of preference.
TEXT_KIND_ORDER = (p.KIND_TEXT, p.KIND_CLIP_TEXT)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: ``lane`` and ``kind``, and the lane's sizes for splitting."""

    lane: str
    kind: str
    model: str  # the name answered back (the one the request used)
    max_request_items: int  # 0: no live engine (send one request; the broker says why)


def parse_aliases(specs: tuple[str, ...]) -> dict[str, str]:
    """``("name=lane", ...)`` as {name (lower case): lane}; ValueError names a bad one."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, lane = spec.partition("=")
        if not sep or not name.strip() or not lane.strip():
            raise ValueError(f"model alias {spec!r} is not NAME=LANE (e.g. "
                             "text-embedding-3-small=text)")
        out[name.strip().lower()] = lane.strip()
    return out


class Models:
    """The model names the gateway answers to, refreshed from each ``info`` answer."""

    def __init__(self, aliases: dict[str, str] | None = None,
                 default_lane: str = p.LANE_TEXT) -> None:
        self.aliases = dict(aliases or {})
        self.default_lane = default_lane
        self.lanes: dict[str, dict[str, Any]] = {}  # lane -> its entry in the last info
        self.limits: dict[str, Any] = {}
        self._announced: dict[str, str] = {}  # lane -> last model name announced
        self._names: dict[str, str] = {}  # name (lower case) -> lane

    def update(self, info: dict[str, Any]) -> None:
        """Take a fresh ``info`` answer."""
        lanes = info.get("lanes")
        if not isinstance(lanes, dict):
            return
        self.lanes = {str(k): v for k, v in lanes.items() if isinstance(v, dict)}
        self.limits = info.get("limits") or {}
        for lane, entry in self.lanes.items():
            if isinstance(entry.get("model"), str) and entry["model"]:
                self._announced[lane] = entry["model"]
        names: dict[str, str] = {}
        for lane, model in self._announced.items():
            for name in (model, model.rstrip("/").rsplit("/", 1)[-1]):
                names.setdefault(name.lower(), lane)
        for lane in self.lanes:
            names[lane.lower()] = lane
        for alias, lane in self.aliases.items():
            names[alias] = lane
        self._names = names

    @property
    def known(self) -> bool:
        """An ``info`` answer has been read."""
        return bool(self.lanes)

    def served(self) -> list[tuple[str, str]]:
        """(model id, lane) of every lane, for ``/v1/models``: the announced name, else the
        lane's name; then each alias."""
        out = [(self._announced.get(lane, lane), lane) for lane in self.lanes]
        out += [(alias, lane) for alias, lane in self.aliases.items() if lane in self.lanes]
        return out

    def lane_of(self, model: str) -> str:
        """The lane that answers to ``model``: 404 when none does, 503 while a lane without
        an engine might (its model name is not known yet)."""
        found = self._names.get(model.lower())
        if found is None or found not in self.lanes:
            waiting = sorted(lane for lane in self.lanes if lane not in self._announced)
            if waiting:
                raise HttpError(503, f"model {model!r} is not known yet: lane(s) "
                                f"{', '.join(waiting)} have no engine to say which models "
                                "they serve", "unavailable", "model", 1.0)
            raise HttpError(404, f"model {model!r} is not served here; served: "
                            f"{', '.join(sorted({m for m, _ in self.served()}))}",
                            "model_not_found", "model")
        return found

    def resolve(self, model: str | None, modality: str) -> Target:
        """The lane and kind for ``model`` (None: the default lane) and ``modality``."""
        if model is None:
            lane = self.default_lane if self.default_lane in self.lanes else next(
                iter(self.lanes), self.default_lane)
            shown = self._announced.get(lane, lane)
        else:
            lane, shown = self.lane_of(model), model
        entry = self.lanes.get(lane, {})
        kinds = [str(k) for k in entry.get("kinds") or p.LANE_KINDS.get(lane) or ()]
        if modality == "image":
            if p.KIND_IMAGE not in kinds:
                raise HttpError(400, f"model {shown!r} does not embed images (lane {lane!r} "
                                f"serves {', '.join(kinds)})", "modality_not_supported",
                                "modality")
            kind = p.KIND_IMAGE
        else:
            kind = next((k for k in TEXT_KIND_ORDER if k in kinds), "")
            if not kind:
                text = [k for k in kinds if k != p.KIND_IMAGE]
                if not text:
                    raise HttpError(400, f"model {shown!r} embeds images only: send "
                                    "\"modality\": \"image\"", "modality_not_supported",
                                    "modality")
                kind = text[0]
        return Target(lane, kind, shown, int(entry.get("max_request_items") or 0))

"""Lane records: what each lane's engines announced, kept in the cache for other brokers.

A broker answers a request whose items are all cache hits without an engine, but it must know
the lane's model fingerprint to build the keys, and until now only a registered engine told
it. So a freshly started broker (a restart, or one more broker beside others) missed every
request until an engine joined. Now each broker writes a lane's record (dim, fingerprints,
prompts, ``dimensions``) to the cache when an engine registers and the record changed, and
reads the records of its lanes once at start: brokers that share a cache serve each other's
vectors from their first request.

The record is a hint for cache keys only: an engine that registers later with another
fingerprint replaces it (and the record), so a redeployed model is never served stale vectors
for longer than it takes its first engine to register; the keys of the old model simply stop
being asked for.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack

from zembed.broker.state import LaneModel
from zembed.cache.backends import Cache
from zembed.cache.keys import KEY_VERSION

log = logging.getLogger("zembed.broker")


def record_key(prefix: str, lane: str) -> bytes:
    """``{prefix}:v1:lane:{lane}`` (no vector key has ``lane`` where the kind goes)."""
    return f"{prefix}:{KEY_VERSION}:lane:{lane}".encode()


def encode(model: LaneModel) -> bytes:
    return bytes(msgpack.packb({"dim": model.dim, "fingerprints": model.fingerprints,
                                "dimensions": model.dimensions, "prompts": model.prompts,
                                "default_prompt": model.default_prompt}))


def decode(raw: bytes) -> LaneModel | None:
    """A record, or None for anything malformed (another writer, another version)."""
    try:
        rec: Any = msgpack.unpackb(raw, raw=False)
        dim, fingerprints = rec["dim"], rec["fingerprints"]
        prompts = rec.get("prompts") or {}
        default_prompt = rec.get("default_prompt")
    except Exception:
        return None
    if (type(dim) is not int or dim <= 0 or not isinstance(fingerprints, dict)
            or not fingerprints or not isinstance(prompts, dict)):
        return None
    if not all(isinstance(k, str) and isinstance(v, str)
               for d in (fingerprints, prompts) for k, v in d.items()):
        return None
    return LaneModel(dim, dict(fingerprints), dimensions=rec.get("dimensions") is True,
                     prompts=dict(prompts),
                     default_prompt=default_prompt if isinstance(default_prompt, str) else None)


class LaneRecords:
    """Publishes lane records on registration and restores them at start."""

    def __init__(self, cache: Cache, prefix: str) -> None:
        self.cache = cache
        self.prefix = prefix
        self._written: dict[str, bytes] = {}

    def restore(self, lanes: tuple[str, ...], models: dict[str, LaneModel]) -> list[str]:
        """Fill ``models`` for the lanes with a record and no model yet (one bounded lookup);
        returns the lanes restored."""
        keys = [record_key(self.prefix, lane) for lane in lanes]
        restored = []
        for lane, raw in zip(lanes, self.cache.get_many(keys), strict=True):
            model = decode(raw) if raw is not None else None
            if model is not None and lane not in models:
                models[lane] = model
                self._written[lane] = raw  # type: ignore[assignment]
                restored.append(lane)
        if restored:
            log.info("lane record(s) from the cache: %s (cache hits served before any engine "
                     "registers)", ", ".join(restored))
        return restored

    def publish(self, lane: str, model: LaneModel) -> None:
        """Write ``lane``'s record if it changed (each registration may refresh it)."""
        raw = encode(model)
        if self._written.get(lane) != raw:
            self._written[lane] = raw
            self.cache.set_many([(record_key(self.prefix, lane), raw)])

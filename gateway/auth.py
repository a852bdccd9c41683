"""Optional API keys: ``Authorization: Bearer KEY``, keys read from a file, reloaded live.

The keys file holds one key per line (blank lines and ``#`` comments ignored). It is read
again when its modification time or size changes (looked at most once a second), so keys are
added and revoked without a restart; a file that cannot be read or parsed keeps the last good
keys (and says so in the log). Keys are compared as SHA-256 digests held in a set, so a lookup
takes the same time whichever key, or how much of one, matches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

log = logging.getLogger("zembed.gateway")

#: The keys file is looked at no more often than this, s.
RELOAD_CHECK_S = 1.0


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def read_keys(path: str) -> set[bytes]:
    """Digests of the keys in ``path``; OSError/ValueError if it cannot be read."""
    with open(path, encoding="utf-8") as fh:
        keys = {line.strip() for line in fh}
    keys = {k for k in keys if k and not k.startswith("#")}
    if any(any(c.isspace() for c in k) for k in keys):
        raise ValueError(f"{path}: a key holds whitespace (one key per line)")
    return {digest(k) for k in keys}


class ApiKeys:
    """The keys of a file, kept current."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._keys = read_keys(path)  # at start a bad file is an error, not a warning
        self._stamp = self._stat()
        self._checked = time.monotonic()
        log.info("API keys: %d from %s", len(self._keys), path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        try:
            keys = read_keys(self.path)
        except (OSError, ValueError) as exc:
            log.warning("API keys file %s could not be read (%s); keeping the %d keys "
                        "read before", self.path, exc, len(self._keys))
            self._stamp = stamp
            return
        self._keys, self._stamp = keys, stamp
        log.info("API keys: %d from %s (reloaded)", len(keys), self.path)

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries a current key."""
        self._refresh()
        if not authorization:
            return False
        scheme, _, key = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        return digest(key.strip()) in self._keys

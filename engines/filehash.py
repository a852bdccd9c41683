"""Content hashes of model files, remembered beside them so a restart does not re-read gigabytes.

The model fingerprint (the cache's namespace) covers every file that can shape a vector, so new
weights under an old name never meet old cache entries. Hashing a multi-gigabyte checkpoint
takes seconds to minutes, on every engine start; so a large file's digest is stored next to it
(``.<name>.zembed-hash``) with the file's size and modification time, and reused while both
match. Where the model folder is read-only (site-packages, a shared mount), the record goes to
the user's cache folder instead (``$XDG_CACHE_HOME/zembed/hashes``), keyed by the file's path.

A record is a hint, never trusted beyond what it keys on: a file replaced in place with the
same size within the same nanosecond would be missed, which no real deployment does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("zembed.engine")

#: Files smaller than this are simply read: a record would cost more than it saves.
REMEMBER_FROM_BYTES = 8 << 20
ALGORITHM = "blake2b-128"


def file_digest(path: Path) -> str:
    """blake2b-128 of a file's bytes; large files' digests are remembered (see module doc)."""
    st = path.stat()
    if st.st_size < REMEMBER_FROM_BYTES:
        return _hash(path)
    key = {"algorithm": ALGORITHM, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    for record in _records(path):
        found = _read(record)
        if found is not None and all(found.get(k) == v for k, v in key.items()):
            digest = found.get("digest")
            if isinstance(digest, str):
                return digest
    digest = _hash(path)
    for record in _records(path):
        if _write(record, {**key, "digest": digest}):
            break
    return digest


def digests(files: list[Path] | tuple[Path, ...], root: Path) -> dict[str, str]:
    """{path relative to ``root``: digest} of every file, for a fingerprint."""
    out = {}
    for file in files:
        try:
            name = str(file.relative_to(root))
        except ValueError:
            name = str(file)
        out[name] = file_digest(file)
    return out


def _hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _records(path: Path) -> list[Path]:
    """Where a file's record may live: beside it, then in the user's cache folder."""
    beside = path.with_name(f".{path.name}.zembed-hash")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zembed" / "hashes"
    keyed = hashlib.blake2b(str(path.resolve()).encode(), digest_size=12).hexdigest()
    return [beside, base / f"{keyed}.json"]


def _read(record: Path) -> dict[str, object] | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(record: Path, data: dict[str, object]) -> bool:
    """Write atomically (a crash leaves the old record or none); False if not writable."""
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data))
        tmp.replace(record)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    log.debug("remembered the digest of %s in %s", record.name, record.parent)
    return True

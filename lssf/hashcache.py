"""A cache of file SHA-256 digests that trusts stat data, the way git's index does.

A digest is stored with the file's absolute path, size, mtime, ctime, inode and device and used
only while all six match: a rewrite moves ``ctime`` (even where ``mtime`` is forced back), a
replacement is a new inode, and only root can reset ``ctime`` (by changing the clock). As git
does with "racily clean" entries, a file modified within ``RACY_MARGIN_S`` before its snapshot,
or while it was hashed, is not stored: a write in the same timestamp tick keeps its stat data.
One JSON entry per path, replaced atomically; an unreadable, corrupt, another user's or stale
entry is a miss, never an error. Pure standard library: importing this costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_DIR = "LSSF_CACHE_DIR"
ENV_SWITCH = "LSSF_HASH_CACHE"
VERSION = 1
# Timestamps come from the kernel's coarse clock (one tick is 1-10 ms); a second is generous.
RACY_MARGIN_S = 1.0
HEX64 = re.compile(r"[0-9a-f]{64}")
_STAT_FIELDS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")


def enabled() -> bool:
    """False when ``LSSF_HASH_CACHE`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """``$LSSF_CACHE_DIR`` if set, else ``~/.cache/lssf/hashes``."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lssf" / "hashes"


def _entry_path(real: str) -> Path:
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()
    return cache_dir() / f"{digest}.json"


@dataclass(frozen=True)
class Snapshot:
    """A file's stat data and the wall-clock time just before it was taken (``snapshot``)."""

    real: str
    stat: os.stat_result
    taken_ns: int

    @property
    def key(self) -> dict[str, object]:
        """The path and stat data a cache entry is stored under."""
        return {"path": self.real, "stat": {f: int(getattr(self.stat, f)) for f in _STAT_FIELDS}}


def snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Take this before hashing ``path`` (``OSError`` if missing); give it to ``store_sha256``."""
    taken = time.time_ns()
    real = os.path.realpath(os.fspath(path))
    return Snapshot(real, os.stat(real), taken)


def unchanged(before: Snapshot) -> bool:
    """Whether the file of ``before`` still has the stat data it had then (False if gone)."""
    try:
        return snapshot(before.real).key == before.key
    except OSError:
        return False


def cached_sha256(path: str | os.PathLike[str]) -> str | None:
    """The stored digest of ``path`` if its stat data is unchanged since hashing, else None."""
    if not enabled():
        return None
    try:
        now = snapshot(path)
        entry = _entry_path(now.real)
        if entry.stat().st_uid != os.getuid():
            log.debug("hash cache entry %s belongs to another user; ignored", entry)
            return None
        data = json.loads(entry.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable or corrupt: a miss
        log.debug("hash cache entry for %s unreadable (%s); ignored", path, exc)
        return None
    return data["sha256"] if _valid(data, now) else None


def _valid(data: Any, snap: Snapshot) -> bool:
    """True when ``data`` is a well-formed entry for exactly the file and stat of ``snap``."""
    digest = data.get("sha256") if isinstance(data, dict) else None
    if not isinstance(digest, str) or not HEX64.fullmatch(digest) or data.get("version") != VERSION:
        log.debug("hash cache entry for %s malformed (version or sha256); ignored", snap.real)
        return False
    return {"path": data.get("path"), "stat": data.get("stat")} == snap.key


def store_sha256(path: str | os.PathLike[str], digest: str, before: Snapshot | None = None) -> bool:
    """Remember ``digest`` for ``path``'s current stat data; True if an entry was written.

    ``before``: ``snapshot(path)`` taken before hashing (default now: safe only if nothing wrote
    the file meanwhile). Nothing is stored for a file changed since, or modified less than
    ``RACY_MARGIN_S`` before it.
    """
    if not isinstance(digest, str) or not HEX64.fullmatch(digest.lower()):
        raise ValueError(f"store_sha256({path!s}): {digest!r} is not a hex SHA-256 digest")
    if not enabled():
        return False
    try:
        now = snapshot(path)
    except OSError as exc:
        log.debug("cannot stat %s (%s); digest not cached", path, exc)
        return False
    ref = before or now
    if ref.key != now.key:
        log.debug("%s changed while it was hashed; digest not cached", now.real)
        return False
    # File timestamps come from the kernel's coarse clock, which lags time.time_ns() by at
    # most a tick, so the age measured here is never larger than the real one.
    if ref.taken_ns - max(ref.stat.st_mtime_ns, ref.stat.st_ctime_ns) < RACY_MARGIN_S * 1e9:
        log.debug("%s was modified too recently to trust its stat data; not cached", now.real)
        return False
    entry = {"version": VERSION, **now.key, "sha256": digest.lower()}
    try:
        _write_atomic(_entry_path(now.real), json.dumps(entry, sort_keys=True))
    except OSError as exc:
        log.debug("cannot write hash cache entry for %s (%s)", now.real, exc)
        return False
    return True


def _write_atomic(target: Path, text: str) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prune() -> int:
    """Delete entries whose file is gone or has changed (and unreadable ones); how many.

    Entries accumulate one per input path ever hashed (temporary folders included); nothing
    calls this on its own. Entries being written by another process are left alone.
    """
    removed = 0
    for entry in sorted(cache_dir().glob("*.json")):
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
            real = data["path"] if isinstance(data, dict) else None
            keep = isinstance(real, str) and _valid(data, Snapshot(real, os.stat(real), 0))
        except (OSError, ValueError, KeyError):
            keep = False
        if not keep:
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 24) -> str:
    """SHA-256 of ``path``: from the cache when its stat data is unchanged, else hashed and stored.

    For files only hashed: one also read for its contents is cheaper hashed as it is read.
    """
    hit = cached_sha256(path)
    if hit is not None:
        return hit
    before = snapshot(path)
    h = hashlib.sha256()
    with open(before.real, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    store_sha256(before.real, digest, before)
    return digest

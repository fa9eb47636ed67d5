"""A cache of file SHA-256 digests that trusts stat data, the way git's index does.

Hashing every input shard costs about 0.8-0.9 CPU-s per GB here (issue #13). A file's digest is
stored with the stat data it had when it was hashed: absolute path, ``st_size``,
``st_mtime_ns``, ``st_ctime_ns``, ``st_ino`` and ``st_dev``. A later lookup is a hit only when
all six still match, so any rewrite (which moves ``ctime``, even where ``mtime`` is forced back
with ``os.utime``) or replacement (a new inode) misses, and the file is hashed again.

What this trusts: that nobody rewrites a file and resets its ``ctime`` (only root, by changing
the clock). What it guards against, as git does with "racily clean" entries: a file modified
within the same timestamp tick as it was hashed keeps its stat data, so a digest is stored only
for a file whose ``ctime`` and ``mtime`` are ``RACY_MARGIN_S`` older than the moment it was
stat'ed before hashing (``snapshot``), and only if the stat is unchanged after hashing (see
``file_sha256``).

Storage: one small JSON file per input path under ``cache_dir()`` (``$LSSF_CACHE_DIR``, else
``~/.cache/lssf/hashes``), named by the SHA-256 of the path, written to a temporary file and
``os.replace``d, so concurrent processes never leave a partial entry (the last writer wins).
An entry that is unreadable, corrupt, of another user, or for other stat data is a miss (logged
at debug level), never an error. ``LSSF_HASH_CACHE=0`` turns the cache off; ``prune()`` drops
entries of files that are gone or changed.

Pure standard library: importing this costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV_DIR = "LSSF_CACHE_DIR"
ENV_SWITCH = "LSSF_HASH_CACHE"
VERSION = 1
# Timestamps come from the kernel's coarse clock (one tick is 1-10 ms); a second is generous.
RACY_MARGIN_S = 1.0
_STAT_FIELDS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")


def enabled() -> bool:
    """False when ``LSSF_HASH_CACHE`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """``$LSSF_CACHE_DIR`` if set, else ``~/.cache/lssf/hashes``."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lssf" / "hashes"


def _key(path: str | os.PathLike[str]) -> tuple[str, os.stat_result]:
    """The absolute, symlink-free path and its stat (raises ``OSError`` if it is missing)."""
    real = os.path.realpath(os.fspath(path))
    return real, os.stat(real)


def _stat_dict(st: os.stat_result) -> dict[str, int]:
    return {f: int(getattr(st, f)) for f in _STAT_FIELDS}


def _entry_path(real: str) -> Path:
    return cache_dir() / (
        hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest() + ".json"
    )


def cached_sha256(path: str | os.PathLike[str]) -> str | None:
    """The stored digest of ``path`` if its stat data is unchanged since hashing, else None."""
    if not enabled():
        return None
    try:
        real, st = _key(path)
        entry = _entry_path(real)
        if entry.stat().st_uid != os.getuid():
            log.debug("hash cache entry %s belongs to another user; ignored", entry)
            return None
        data = json.loads(entry.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable or corrupt: a miss
        log.debug("hash cache entry for %s unreadable (%s); ignored", path, exc)
        return None
    if not _valid(data, real, st):
        return None
    return data["sha256"]


def _valid(data: object, real: str, st: os.stat_result) -> bool:
    """True when ``data`` is a well-formed entry for ``real`` with exactly the stat ``st``."""
    if not isinstance(data, dict) or data.get("version") != VERSION:
        log.debug("hash cache entry for %s malformed; ignored", real)
        return False
    digest = data.get("sha256")
    if not isinstance(digest, str) or not _is_hex64(digest):
        log.debug("hash cache entry for %s has no valid sha256; ignored", real)
        return False
    return data.get("path") == real and data.get("stat") == _stat_dict(st)


@dataclass(frozen=True)
class Snapshot:
    """A file's stat data and the wall-clock time just before it was taken (``snapshot``)."""

    real: str
    stat: os.stat_result
    taken_ns: int


def snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Take this before hashing ``path``; hand it to ``store_sha256`` afterwards."""
    taken = time.time_ns()
    real, st = _key(path)
    return Snapshot(real, st, taken)


def unchanged(before: Snapshot) -> bool:
    """Whether the file of ``before`` still has the stat data it had then (False if gone)."""
    try:
        real, st = _key(before.real)
    except OSError:
        return False
    return real == before.real and _stat_dict(st) == _stat_dict(before.stat)


def store_sha256(path: str | os.PathLike[str], digest: str, before: Snapshot | None = None) -> bool:
    """Remember ``digest`` for ``path``'s current stat data; True if an entry was written.

    ``before``: ``snapshot(path)`` taken before hashing began. Nothing is stored if the file has
    changed since then, or if it was modified less than ``RACY_MARGIN_S`` before the snapshot (a
    rewrite within the same timestamp tick would not change its stat data). Without ``before``
    the current stat and time stand in for it, which is only safe if nothing wrote the file
    while it was hashed. A digest that is not 64 hex digits is a ``ValueError``; failing to
    write the entry is logged at debug level and returns False.
    """
    if not isinstance(digest, str) or not _is_hex64(digest.lower()):
        raise ValueError(f"store_sha256({path!s}): {digest!r} is not a hex SHA-256 digest")
    if not enabled():
        return False
    try:
        now = snapshot(path)
    except OSError as exc:
        log.debug("cannot stat %s (%s); digest not cached", path, exc)
        return False
    ref = before if before is not None else now
    if ref.real != now.real or _stat_dict(ref.stat) != _stat_dict(now.stat):
        log.debug("%s changed while it was hashed; digest not cached", now.real)
        return False
    if _racy(ref):
        log.debug("%s was modified too recently to trust its stat data; not cached", now.real)
        return False
    entry = {"version": VERSION, "path": now.real, "stat": _stat_dict(now.stat),
             "sha256": digest.lower()}  # fmt: skip
    try:
        _write_atomic(_entry_path(now.real), json.dumps(entry, sort_keys=True))
    except OSError as exc:
        log.debug("cannot write hash cache entry for %s (%s)", now.real, exc)
        return False
    return True


def _is_hex64(digest: str) -> bool:
    return len(digest) == 64 and not digest.strip("0123456789abcdef")


def _racy(snap: Snapshot) -> bool:
    """True when the file changed less than ``RACY_MARGIN_S`` before the snapshot was taken.

    File timestamps come from the kernel's coarse clock, which lags ``time.time_ns()`` by at
    most a tick, so the difference measured here is never larger than the real one.
    """
    newest = max(snap.stat.st_mtime_ns, snap.stat.st_ctime_ns)
    return snap.taken_ns - newest < RACY_MARGIN_S * 1e9


def _write_atomic(target: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``target`` and rename it into place."""
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
    folder = cache_dir()
    for entry in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
            real = data["path"] if isinstance(data, dict) else None
            keep = isinstance(real, str) and _valid(data, real, os.stat(real))
        except (OSError, ValueError, KeyError):
            keep = False
        if not keep:
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 24) -> str:
    """SHA-256 of ``path``: from the cache when its stat data is unchanged, else hashed and stored.

    The drop-in for ``lssf.st_io.file_sha256`` where a file is only hashed (not also read for
    its contents, where hashing the bytes already read is cheaper than a lookup miss).
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

"""The stat-keyed SHA-256 cache (``lssf.hashcache``): hits, misses on any rewrite, robustness."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lssf import hashcache

ROOT = Path(__file__).resolve().parents[1]
TICK_S = 0.05  # longer than a kernel timestamp tick (1-10 ms), so a later write moves ctime


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache folder; the racy-write margin off unless a test puts it back."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(hashcache.ENV_DIR, str(folder))
    monkeypatch.delenv(hashcache.ENV_SWITCH, raising=False)
    monkeypatch.setattr(hashcache, "RACY_MARGIN_S", 0.0)
    return folder


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json")) if folder.exists() else []


def test_hit_after_store(cache: Path, tmp_path: Path) -> None:
    f = tmp_path / "a.safetensors"
    digest = write(f, b"x" * 1000)
    assert hashcache.cached_sha256(f) is None
    assert hashcache.store_sha256(f, digest)
    assert hashcache.cached_sha256(f) == digest
    # Another spelling of the same file (relative, through a symlink) is the same entry.
    link = tmp_path / "link.safetensors"
    link.symlink_to(f)
    assert hashcache.cached_sha256(link) == digest
    assert len(entries(cache)) == 1
    assert json.loads(entries(cache)[0].read_text())["path"] == os.path.realpath(f)


def test_in_place_rewrite_same_size_same_mtime_misses(cache: Path, tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    old = write(f, b"a" * 4096)
    hashcache.store_sha256(f, old)
    st = f.stat()
    time.sleep(TICK_S)
    with f.open("r+b") as fh:  # same inode, same size
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime forced back
    now = f.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert now.st_ctime_ns != st.st_ctime_ns  # only ctime tells the rewrite apart
    assert hashcache.cached_sha256(f) is None
    assert hashcache.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() != old


def test_replaced_file_misses(cache: Path, tmp_path: Path) -> None:
    f, new = tmp_path / "a.bin", tmp_path / "a.bin.new"
    old = write(f, b"a" * 4096)
    hashcache.store_sha256(f, old)
    st = f.stat()
    write(new, b"b" * 4096)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, f)  # what an atomic writer does: a new inode under the same name
    assert f.stat().st_ino != st.st_ino
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert hashcache.cached_sha256(f) is None


def test_disabled_by_env(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "a.bin"
    digest = write(f, b"abc")
    assert hashcache.store_sha256(f, digest)
    monkeypatch.setenv(hashcache.ENV_SWITCH, "0")
    assert hashcache.cached_sha256(f) is None  # an existing entry is not used
    g = tmp_path / "b.bin"
    assert not hashcache.store_sha256(g, write(g, b"def"))
    assert hashcache.file_sha256(g) == hashlib.sha256(b"def").hexdigest()
    assert len(entries(cache)) == 1  # nothing written while disabled


def test_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(hashcache.ENV_DIR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hashcache.cache_dir() == tmp_path / ".cache" / "lssf" / "hashes"
    monkeypatch.setenv(hashcache.ENV_DIR, str(tmp_path / "elsewhere"))
    assert hashcache.cache_dir() == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    "content",
    [b"\x00\xff garbage", b'{"version": 1, "path": ', b"[]", b'{"version": 1, "sha256": 5}'],
    ids=["binary", "truncated", "not-a-dict", "wrong-types"],
)
def test_corrupt_entry_is_a_logged_miss(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    f = tmp_path / "a.bin"
    digest = write(f, b"payload")
    hashcache.store_sha256(f, digest)
    (entry,) = entries(cache)
    entry.write_bytes(content)
    with caplog.at_level(logging.DEBUG, logger="lssf.hashcache"):
        assert hashcache.cached_sha256(f) is None
    assert "ignored" in caplog.text
    assert hashcache.file_sha256(f) == digest  # rehashed, and the entry repaired
    assert json.loads(entry.read_text())["sha256"] == digest


def test_tampered_digest_or_stat_is_not_trusted(cache: Path, tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    digest = write(f, b"payload")
    hashcache.store_sha256(f, digest)
    (entry,) = entries(cache)
    data = json.loads(entry.read_text())
    entry.write_text(json.dumps(data | {"sha256": "Z" * 64}))
    assert hashcache.cached_sha256(f) is None
    entry.write_text(json.dumps(data | {"stat": data["stat"] | {"st_size": 1}}))
    assert hashcache.cached_sha256(f) is None
    entry.write_text(json.dumps(data | {"path": "/elsewhere"}))
    assert hashcache.cached_sha256(f) is None


def test_unusable_cache_folder_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv(hashcache.ENV_DIR, str(blocker))
    monkeypatch.setattr(hashcache, "RACY_MARGIN_S", 0.0)
    f = tmp_path / "a.bin"
    digest = write(f, b"payload")
    assert not hashcache.store_sha256(f, digest)
    assert hashcache.cached_sha256(f) is None
    assert hashcache.file_sha256(f) == digest
    assert hashcache.cached_sha256(tmp_path / "missing.bin") is None


def test_bad_digest_is_refused(cache: Path, tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    write(f, b"payload")
    with pytest.raises(ValueError, match=r"a\.bin.*not a hex SHA-256"):
        hashcache.store_sha256(f, "abc")


def test_recently_modified_file_is_not_stored(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file written within the margin could change again without its stat data changing."""
    monkeypatch.setattr(hashcache, "RACY_MARGIN_S", 30.0)
    f = tmp_path / "a.bin"
    digest = write(f, b"fresh")
    assert not hashcache.store_sha256(f, digest)
    assert hashcache.file_sha256(f) == digest
    assert hashcache.cached_sha256(f) is None
    assert entries(cache) == []


def test_file_changed_while_hashing_is_not_stored(cache: Path, tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    write(f, b"before")
    snap = hashcache.snapshot(f)
    time.sleep(TICK_S)
    digest = write(f, b"after!")  # same size; written between the snapshot and the store
    assert not hashcache.store_sha256(f, digest, snap)
    assert hashcache.cached_sha256(f) is None


def test_file_sha256_uses_the_cache(cache: Path, tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    digest = write(f, os.urandom(3 << 20))
    assert hashcache.file_sha256(f, chunk=1 << 20) == digest
    (entry,) = entries(cache)
    fake = "0" * 64  # proves the second call reads the entry instead of the file
    entry.write_text(json.dumps(json.loads(entry.read_text()) | {"sha256": fake}))
    assert hashcache.file_sha256(f) == fake


def test_prune_drops_stale_entries_only(cache: Path, tmp_path: Path) -> None:
    keep, gone, changed = (tmp_path / n for n in ("keep.bin", "gone.bin", "changed.bin"))
    for f in (keep, gone, changed):
        hashcache.store_sha256(f, write(f, f.name.encode()))
    (cache / ("f" * 64 + ".json")).write_text("{not json")
    gone.unlink()
    time.sleep(TICK_S)
    write(changed, b"new content")
    assert hashcache.prune() == 3
    assert len(entries(cache)) == 1
    assert hashcache.cached_sha256(keep) == hashlib.sha256(b"keep.bin").hexdigest()


WRITER = """
import sys
from lssf import hashcache
hashcache.RACY_MARGIN_S = 0.0
path, digest, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    assert hashcache.store_sha256(path, digest), i
    assert hashcache.store_sha256(path + f".{digest[0]}.{i % 7}", digest), i
"""


def test_concurrent_writers_leave_a_readable_cache(cache: Path, tmp_path: Path) -> None:
    f = tmp_path / "shared.bin"
    write(f, b"shared")
    for i in range(7):
        for tag in "ab":
            write(tmp_path / f"shared.bin.{tag}.{i}", b"other")
    digests = {"a" * 64, "b" * 64}  # each process claims its own, to see whose entry wins
    env = os.environ | {hashcache.ENV_DIR: str(cache), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(f), d, "150"], env=env, cwd=ROOT)
        for d in sorted(digests)
    ]
    seen: set[str | None] = set()
    while any(p.poll() is None for p in procs):
        for entry in entries(cache):  # every entry visible at any moment is complete JSON
            assert json.loads(entry.read_text())["sha256"] in digests
        seen.add(hashcache.cached_sha256(f))
        time.sleep(0.001)
    assert [p.returncode for p in procs] == [0, 0]
    assert hashcache.cached_sha256(f) in digests
    assert len(entries(cache)) == 1 + 14
    assert not list(cache.glob("*.tmp"))  # no temporary file left behind
    assert seen <= digests | {None}


def test_module_imports_nothing_heavy() -> None:
    """Loaded on its own (not through ``lssf/__init__``), the module pulls in no third party."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("hc", {str(ROOT / "lssf/hashcache.py")!r})
        sys.modules["hc"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        heavy = {{"torch", "numpy", "safetensors", "pydantic", "prefect", "mlflow", "lm_eval"}}
        print(sorted(heavy & set(sys.modules)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

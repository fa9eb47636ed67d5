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


# --- wired into fuse: input shards hashed once per stat data, not on every run ---


@pytest.fixture(scope="module")
def fuse_world(tmp_path_factory: pytest.TempPathFactory):
    from lssf import extract
    from lssf.synthetic import LlamaShape, make_trio

    shape = LlamaShape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=96)
    root = tmp_path_factory.mktemp("fuse-cache")
    trio = make_trio(root, shape, seed=5, shard_bytes=60_000)
    patch = extract(trio["aligned"], trio["reference"], root / "patch", progress=False)
    return trio["finetuned"], patch


def fuse_files(ft: Path, patch, out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list]:
    """Fuse into ``out``: the provenance's shard hashes and how each shard was streamed."""
    from lssf import fuse
    from lssf.checkpoint import Checkpoint

    streamed: list[bool] = []
    plain = Checkpoint.iter_file

    def spy(self, header, *args, hash: bool = True, **kwargs):
        streamed.append(hash)
        return plain(self, header, *args, hash=hash, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "iter_file", spy)
        fuse(ft, patch, out, progress=False)
    prov = json.loads((out / "lssf_provenance.json").read_text())
    files = prov["sources"]["finetuned"]["files"]
    return {k: v for k, v in files.items() if k.endswith(".safetensors")}, streamed


def true_hashes(ft: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ft.glob("*.safetensors")}


def test_fuse_twice_same_provenance_second_from_the_cache(
    cache: Path, fuse_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ft, patch = fuse_world
    first, how1 = fuse_files(ft, patch, tmp_path / "a", monkeypatch)
    assert first == true_hashes(ft) and len(first) > 1
    assert how1 == [True] * len(first)  # hashed while read, then stored
    second, how2 = fuse_files(ft, patch, tmp_path / "b", monkeypatch)
    assert how2 == [False] * len(first)  # not hashed again
    assert second == first
    fused = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    for name in fused:  # the same output either way
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_fuse_after_in_place_rewrite_same_size_and_mtime_rehashes(
    cache: Path, fuse_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lssf.st_io import read_header

    src, patch = fuse_world
    ft = tmp_path / "ft"
    ft.mkdir()
    for f in src.iterdir():
        (ft / f.name).write_bytes(f.read_bytes())
    first, _ = fuse_files(ft, patch, tmp_path / "a", monkeypatch)
    shard = sorted(ft.glob("*.safetensors"))[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[read_header(shard).data_start] ^= 1  # the lowest mantissa bit of the first value
    time.sleep(TICK_S)
    with shard.open("r+b") as fh:  # in place: same inode, same size
        fh.write(data)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second, how = fuse_files(ft, patch, tmp_path / "b", monkeypatch)
    assert second == true_hashes(ft)
    assert second[shard.name] != first[shard.name]
    assert how[sorted(first).index(shard.name)] is True
    assert {k: v for k, v in second.items() if k != shard.name} == {
        k: v for k, v in first.items() if k != shard.name
    }


def test_fuse_with_the_cache_off_rehashes(
    cache: Path, fuse_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ft, patch = fuse_world
    first, _ = fuse_files(ft, patch, tmp_path / "a", monkeypatch)
    monkeypatch.setenv(hashcache.ENV_SWITCH, "0")
    second, how = fuse_files(ft, patch, tmp_path / "b", monkeypatch)
    assert how == [True] * len(first)
    assert second == first == true_hashes(ft)


def test_fuse_trusts_the_cache_only_for_the_stat_data(
    cache: Path, fuse_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a hit means: the recorded digest, not the bytes hashed again in this run. An entry
    # for the file's current stat data is believed (here a forged one, to show it is used).
    ft, patch = fuse_world
    first, _ = fuse_files(ft, patch, tmp_path / "a", monkeypatch)
    shard = sorted(ft.glob("*.safetensors"))[0]
    entry = hashcache._entry_path(os.path.realpath(shard))
    data = json.loads(entry.read_text())
    data["sha256"] = "0" * 64
    entry.write_text(json.dumps(data))
    second, _ = fuse_files(ft, patch, tmp_path / "b", monkeypatch)
    assert second[shard.name] == "0" * 64
    monkeypatch.setenv(hashcache.ENV_SWITCH, "0")
    third, _ = fuse_files(ft, patch, tmp_path / "c", monkeypatch)
    assert third == first


def test_auto_read_mode_maps_a_shard_only_when_its_digest_is_cached(
    cache: Path, fuse_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hashing needs the bytes read (pread into buffers); a cached digest leaves nothing to hash,
    # so the shard is mapped instead. The output bytes are the same either way.
    import importlib

    from lssf.checkpoint import Checkpoint

    assert importlib.import_module("lssf.fuse").READ_MODE == "auto"
    ft, patch = fuse_world
    mapped: list[str] = []
    plain = Checkpoint.mapped

    def spy(self, header):
        mapped.append(header.path.name)
        return plain(self, header)

    monkeypatch.setattr(Checkpoint, "mapped", spy)
    _, how1 = fuse_files(ft, patch, tmp_path / "a", monkeypatch)
    assert mapped == [] and all(how1)
    _, how2 = fuse_files(ft, patch, tmp_path / "b", monkeypatch)
    assert not any(how2) and sorted(mapped) == sorted(p.name for p in ft.glob("*.safetensors"))
    for out in (tmp_path / "a").glob("*.safetensors"):
        assert out.read_bytes() == (tmp_path / "b" / out.name).read_bytes()


@pytest.fixture(scope="module")
def lora_world(fuse_world, tmp_path_factory: pytest.TempPathFactory):
    """A PEFT LoRA adapter on the trio's aligned model (the patch itself, exported), its base."""
    from lssf.adapter_out import export_patch_adapter

    ft, patch = fuse_world
    out = tmp_path_factory.mktemp("lora-cache") / "adapter"
    adapter = export_patch_adapter(patch, out, alpha=0.5, progress=False)
    return adapter, ft.parent / "aligned", patch


def test_fuse_an_adapter_twice_its_base_from_the_cache_the_second_time(
    cache: Path, lora_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A LoRA's base shards are streamed like a full fine-tune's: hashed while read the first
    # time, the digest stored, then taken from the cache (and the shards mapped).
    from lssf import fuse
    from lssf.checkpoint import Checkpoint

    adapter, aligned, patch = lora_world
    plain = Checkpoint.iter_file
    runs: list[tuple[list[bool], dict]] = []
    for out in (tmp_path / "a", tmp_path / "b"):
        streamed: list[bool] = []

        def spy(self, header, *args, hash: bool = True, _seen=streamed, **kwargs):
            _seen.append(hash)
            return plain(self, header, *args, hash=hash, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(Checkpoint, "iter_file", spy)
            fuse(adapter, patch, out, aligned=aligned, progress=False)
        prov = json.loads((out / "lssf_provenance.json").read_text())
        runs.append((streamed, prov["sources"]["finetuned_base"]["files"]))
    (how1, files1), (how2, files2) = runs
    shards = {k: v for k, v in files1.items() if k.endswith(".safetensors")}
    assert shards == true_hashes(aligned) and len(shards) > 1
    assert how1 == [True] * len(shards) and how2 == [False] * len(shards)
    assert files2 == files1
    for f in (tmp_path / "a").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()

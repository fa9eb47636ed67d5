"""Resolving model references: local folders, and Hub ids against a local stand-in of the Hub."""

from __future__ import annotations

import pytest

from lssf import extract, fuse
from lssf.errors import CheckpointError
from lssf.sources import ModelRef, local_revision, resolve_source, with_hashes
from lssf.synthetic import LlamaShape, make_trio
from tests.fakehub import FakeHub

SHAPE = LlamaShape(hidden=16, intermediate=32, layers=1, heads=2, kv_heads=2, vocab=32)


def _split(ref: str) -> tuple[str, str | None]:
    parsed = ModelRef.parse(ref)
    return parsed.repo, parsed.revision


def test_split_ref():
    assert _split("org/name@abc123") == ("org/name", "abc123")
    assert _split("org/name") == ("org/name", None)


def test_model_ref_parse_str_and_pinned(tmp_path):
    ref = ModelRef.parse("org/name@refs/pr/1")
    assert (ref.repo, ref.revision, ref.kind) == ("org/name", "refs/pr/1", "hub")
    sha = "a" * 40
    assert str(ModelRef.parse(f"org/name@{sha}")) == f"org/name@{sha}"
    assert ModelRef.parse(f"org/name@{sha}").pinned
    assert not ModelRef.parse("org/name@main").pinned
    assert str(ModelRef.parse("org/name")) == "org/name"
    odd = tmp_path / "with@at"
    odd.mkdir()
    local = ModelRef.parse(odd)  # an existing path never splits on @
    assert local.is_local and local.repo == str(odd.resolve()) and str(local) == local.repo
    assert not local.pinned and ModelRef.parse(local) is local
    for bad in ("not a ref", "org/", "a/b/c", "org/name@v1@beta"):
        with pytest.raises(CheckpointError, match="neither an existing folder"):
            ModelRef.parse(bad)
    with pytest.raises(CheckpointError, match="empty model reference"):
        ModelRef.parse("")
    with pytest.raises(CheckpointError, match="has no revisions"):
        ModelRef.parse(f"{odd}@main")


def test_local_revision_is_the_provenance_revision(tmp_path):
    trio = make_trio(tmp_path / "src", SHAPE)
    folder = trio["finetuned"]
    pinned = ModelRef.parse(folder).pin()
    assert pinned.pinned and pinned.revision == local_revision(folder)
    patch = extract(trio["aligned"], trio["reference"], tmp_path / "patch")
    result = fuse(folder, patch, tmp_path / "out", force=True)
    assert result.finetuned.revision == pinned.revision
    assert patch.manifest.aligned.revision == local_revision(trio["aligned"])
    _, rec = resolve_source(folder)
    assert with_hashes(rec, result.finetuned.files).revision == pinned.revision
    (folder / "config.json").write_text("{}")  # a side file is part of the content
    assert local_revision(folder) != pinned.revision


def test_local_folder_and_bad_refs(tmp_path):
    folder, rec = resolve_source(tmp_path)
    assert rec.kind == "local" and folder == tmp_path.resolve()
    with pytest.raises(CheckpointError, match="neither an existing folder nor a Hub id"):
        resolve_source("no such thing")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_source(tmp_path / "f.txt")


def test_hub_models_are_downloaded_pinned_and_recorded(tmp_path, monkeypatch):
    trio = make_trio(tmp_path / "src", SHAPE)
    (trio["aligned"] / "pytorch_model.bin").write_bytes(b"pickle that must not be fetched")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with FakeHub(models=[]) as hub:
        hub.use(monkeypatch)
        sha_a = hub.add_repo("acme/aligned", trio["aligned"])
        hub.add_repo("acme/base", trio["reference"])
        sha_ft = hub.add_repo("acme/finetune", trio["finetuned"])
        folder, rec = resolve_source("acme/aligned@main", cache_dir=tmp_path / "cache")
        pinned = ModelRef.parse("acme/aligned").pin()  # asks the API, downloads nothing
        assert pinned.pinned and str(pinned) == f"acme/aligned@{sha_a}"
        assert resolve_source(pinned, cache_dir=tmp_path / "cache")[1].revision == sha_a
        assert rec.kind == "hub" and rec.repo_id == "acme/aligned" and rec.revision == sha_a
        assert (folder / "config.json").exists()
        assert not (folder / "pytorch_model.bin").exists()  # only safetensors/JSON/tokenizer
        patch = extract("acme/aligned", "acme/base", tmp_path / "patch")
        result = fuse(f"acme/finetune@{sha_ft}", patch, tmp_path / "out", force=True)
    assert patch.manifest.aligned.revision == sha_a
    assert result.finetuned.revision == sha_ft and result.finetuned.repo_id == "acme/finetune"
    assert "acme/finetune" in (tmp_path / "out" / "README.md").read_text()


def test_unknown_hub_repo_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with FakeHub(models=[]) as hub:
        hub.use(monkeypatch)
        with pytest.raises(CheckpointError, match="acme/missing"):
            resolve_source("acme/missing")

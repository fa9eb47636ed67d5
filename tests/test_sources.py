"""Resolving model references: local folders, and Hub ids against a local stand-in of the Hub."""

from __future__ import annotations

import pytest

from lssf import extract, fuse
from lssf.errors import CheckpointError
from lssf.sources import resolve_source, split_ref
from lssf.synthetic import LlamaShape, make_trio
from tests.fakehub import FakeHub

SHAPE = LlamaShape(hidden=16, intermediate=32, layers=1, heads=2, kv_heads=2, vocab=32)


def test_split_ref():
    assert split_ref("org/name@abc123") == ("org/name", "abc123")
    assert split_ref("org/name") == ("org/name", None)


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

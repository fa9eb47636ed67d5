"""Watch sources: local folder hashing, and the Hub source against recorded responses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tasks.config import WatchConfig
from tasks.sources import (
    Candidate,
    HubSource,
    HubUnavailableError,
    LocalFolderSource,
    content_hash,
    list_candidates,
)
from tests.fakehub import FakeHub

BASE = "Qwen/Qwen2.5-0.5B-Instruct"


def _model(folder: Path, text: str = "w") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_text(text)
    return folder


def _hub_config(**kw: object) -> WatchConfig:
    return WatchConfig(kind="hub", backoff_seconds=0.0, **kw)  # type: ignore[arg-type]


# -- local folder -----------------------------------------------------------------------------


def test_content_hash_tracks_content_not_location(tmp_path: Path) -> None:
    a = _model(tmp_path / "a")
    b = _model(tmp_path / "b")
    assert content_hash(a) == content_hash(b)
    (b / "model.safetensors").write_text("changed")
    assert content_hash(a) != content_hash(b)
    (a / ".cache").mkdir()
    (a / ".cache" / "lock").write_text("x")
    assert content_hash(a) == content_hash(_model(tmp_path / "c"))


def test_local_source_lists_model_folders_newest_first(tmp_path: Path) -> None:
    old = _model(tmp_path / "w" / "old", "1")
    new = _model(tmp_path / "w" / "new", "2")
    (tmp_path / "w" / "not-a-model").mkdir()
    now = time.time()
    import os

    os.utime(old, (now - 100, now - 100))
    os.utime(new, (now, now))
    found = LocalFolderSource(tmp_path / "w").list()
    assert [Path(c.repo).name for c in found] == ["new", "old"]
    assert all(c.lineage == "local" and c.spec == c.repo for c in found)
    assert found[0].key == f"{new}@{content_hash(new)}"


def test_local_source_missing_folder_is_empty(tmp_path: Path) -> None:
    assert LocalFolderSource(tmp_path / "nothing").list() == []


# -- Hub ----------------------------------------------------------------------------------------


def test_hub_lineage_filters_newest_first_with_paging(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub(page_size=2) as hub:
        hub.use(monkeypatch)
        found = HubSource(BASE, _hub_config()).list()
        listing = [r for r in hub.requests if r.path == "/api/models"]
    assert [c.repo for c in found] == [
        "acme/qwen05-support-ft",
        "gamma/qwen05-tools-lora",
        "acme/qwen05-sql-ft",
        "beta-lab/qwen05-medical",
        "epsilon/qwen05-chat-ft",
    ]
    assert {c.lineage for c in found} == {"finetune", "adapter"}
    assert found[0].revision == "1" * 40
    assert "delta/qwen05-base-ft" not in {c.repo for c in found}  # other base model
    assert len(listing) == 2 + 1  # finetune: 4 models in 2 linked pages; adapter: 1 page


def test_hub_candidate_spec_pins_the_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub() as hub:
        hub.use(monkeypatch)
        found = list_candidates(_hub_config(lineages=("adapter",)), f"{BASE}@main")
    assert [c.spec for c in found] == ["gamma/qwen05-tools-lora@" + "4" * 40]


def test_hub_max_candidates_stops_paging(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub(page_size=2) as hub:
        hub.use(monkeypatch)
        found = HubSource(BASE, _hub_config(lineages=("finetune",), max_candidates=2)).list()
        listing = [r for r in hub.requests if r.path == "/api/models"]
    assert len(found) == 2 and len(listing) == 1


def test_hub_backs_off_on_429_and_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    with FakeHub() as hub:
        hub.use(monkeypatch)
        hub.fail_next(429)
        found = HubSource(BASE, _hub_config(lineages=("finetune",)), sleep=waits.append).list()
        statuses = len(hub.requests)
    assert len(found) == 4
    assert waits == [0.0]  # Retry-After: 0 from the server wins over our own backoff
    assert statuses == 1 + 2  # the 429, then both pages


def test_hub_backoff_doubles_and_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    with FakeHub() as hub:
        hub.use(monkeypatch)
        hub.fail_next(503, 503, 503, 503)
        monkeypatch.setattr("tasks.sources._retry_after", lambda response: None)
        cfg = WatchConfig(kind="hub", backoff_seconds=0.5, max_retries=2)
        with pytest.raises(HubUnavailableError, match="3 attempts"):
            HubSource(BASE, cfg, sleep=waits.append).list()
    assert waits == [0.5, 1.0]


def test_unreachable_hub_raises_hub_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub() as hub:
        url = hub.url
    cfg = _hub_config(max_retries=1)
    with pytest.raises(HubUnavailableError):
        HubSource(BASE, cfg, endpoint=url, sleep=lambda s: None).list()


def test_offline_mode_refuses_hub_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        HubSource(BASE, _hub_config()).list()


def test_hub_token_sent_but_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = "hf_TESTtokenNEVERlogged0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level("DEBUG")
    with FakeHub() as hub:
        hub.use(monkeypatch)
        hub.fail_next(429)
        HubSource(BASE, _hub_config(lineages=("finetune",)), sleep=lambda s: None).list()
        auth = {r.authorization for r in hub.requests}
    assert auth == {f"Bearer {token}"}
    assert token not in caplog.text


def test_fakehub_serves_snapshot_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    src = _model(tmp_path / "src", "weights")
    (src / "sub").mkdir()
    (src / "sub" / "tokenizer.json").write_text("{}")
    with FakeHub() as hub:
        hub.use(monkeypatch)
        sha = hub.add_repo("org/tiny", src)
        path = Path(snapshot_download("org/tiny", cache_dir=tmp_path / "cache"))
        pinned = Path(snapshot_download("org/tiny", revision=sha, cache_dir=tmp_path / "c2"))
    assert path.name == sha
    assert (path / "model.safetensors").read_text() == "weights"
    assert (pinned / "sub" / "tokenizer.json").read_text() == "{}"


def test_candidate_key_and_spec() -> None:
    hub = Candidate(repo="org/m", revision="abc", lineage="finetune")
    local = Candidate(repo="/w/m", revision="123", lineage="local")
    assert (hub.key, hub.spec) == ("org/m@abc", "org/m@abc")
    assert (local.key, local.spec) == ("/w/m@123", "/w/m")


def test_fakehub_model_info_without_revision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi

    with FakeHub() as hub:
        hub.use(monkeypatch)
        sha = hub.add_repo("org/tiny", _model(tmp_path / "src"))
        assert HfApi().model_info("org/tiny").sha == sha
        assert HfApi().model_info("org/tiny", revision=sha).sha == sha

"""Watch sources: local folder revisions, and the Hub source on replayed Hub responses."""

from __future__ import annotations

import os
import time
import types
from pathlib import Path

import httpx
import pytest

from lssf.sources import local_revision
from tasks.config import WatchConfig
from tasks.sources import (
    Candidate,
    HubSource,
    HubUnavailableError,
    LocalFolderSource,
    list_candidates,
)
from tests.fakehub import FakeHub, replay_hub

BASE = "Qwen/Qwen2.5-0.5B-Instruct"


def _model(folder: Path, text: str = "w") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_text(text)
    return folder


def _hub_config(**kw: object) -> WatchConfig:
    return WatchConfig(kind="hub", **kw)  # type: ignore[arg-type]


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The Hub client's backoff sleeps, recorded instead of slept."""
    slept: list[float] = []
    fake_time = types.SimpleNamespace(sleep=slept.append)
    monkeypatch.setattr("huggingface_hub.utils._http.time", fake_time)
    return slept


# -- local folder -----------------------------------------------------------------------------


def test_local_revision_tracks_content_not_location(tmp_path: Path) -> None:
    a = _model(tmp_path / "a")
    b = _model(tmp_path / "b")
    assert local_revision(a) == local_revision(b)
    (b / "model.safetensors").write_text("changed")
    assert local_revision(a) != local_revision(b)
    (a / ".cache").mkdir()
    (a / ".cache" / "lock").write_text("x")
    assert local_revision(a) == local_revision(_model(tmp_path / "c"))


def test_local_source_lists_model_folders_newest_first(tmp_path: Path) -> None:
    old = _model(tmp_path / "w" / "old", "1")
    new = _model(tmp_path / "w" / "new", "2")
    (tmp_path / "w" / "not-a-model").mkdir()
    _model(tmp_path / "w" / ".new.tmp-1-ab-host", "3")  # an unfinished copy
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(new, (now, now))
    found = LocalFolderSource(tmp_path / "w").list()
    assert [Path(c.repo).name for c in found] == ["new", "old"]
    assert all(c.lineage == "local" and c.spec == c.repo for c in found)
    assert found[0].key == f"{new}@{local_revision(new)}"


def test_local_source_skips_a_folder_without_weights(tmp_path: Path) -> None:
    good = _model(tmp_path / "w" / "good")
    (tmp_path / "w" / "broken").mkdir()
    (tmp_path / "w" / "broken" / "config.json").write_text("{}")  # no weights (yet)
    assert [c.repo for c in LocalFolderSource(tmp_path / "w").list()] == [str(good)]


def test_local_source_missing_folder_is_empty(tmp_path: Path) -> None:
    assert LocalFolderSource(tmp_path / "nothing").list() == []


# -- Hub, replayed ------------------------------------------------------------------------------


def test_hub_lineage_filters_newest_first_with_paging(monkeypatch: pytest.MonkeyPatch) -> None:
    with replay_hub(monkeypatch) as hub:
        found = HubSource(BASE, _hub_config()).list()
        listing = hub.calls
    assert [c.repo for c in found] == [
        "acme/qwen05-support-ft",
        "gamma/qwen05-tools-lora",
        "acme/qwen05-sql-ft",
        "beta-lab/qwen05-medical",
        "epsilon/qwen05-chat-ft",
    ]
    assert {c.lineage for c in found} == {"finetune", "adapter"}
    assert found[0].revision == "1" * 40
    assert found[0].created_at is not None and found[0].created_at.startswith("2026-03-04")
    assert "delta/qwen05-base-ft" not in {c.repo for c in found}  # other base model
    assert len(listing) == 2 + 1  # finetune: 2 linked pages; adapter: 1 page
    query = listing[0].request.url.params
    assert query["sort"] == "createdAt" and query["limit"] == "20"
    assert {"sha", "createdAt", "tags"} <= set(query.get_list("expand"))


def test_hub_candidate_spec_pins_the_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    with replay_hub(monkeypatch):
        found = list_candidates(_hub_config(lineages=("adapter",)), f"{BASE}@main")
    assert [c.spec for c in found] == ["gamma/qwen05-tools-lora@" + "4" * 40]


def test_hub_max_candidates_stops_paging(monkeypatch: pytest.MonkeyPatch) -> None:
    with replay_hub(monkeypatch) as hub:
        found = HubSource(BASE, _hub_config(lineages=("finetune",), max_candidates=2)).list()
        listing = hub.calls
    assert len(found) == 2 and len(listing) == 1


def test_hub_backs_off_on_429_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, waits: list[float]
) -> None:
    with replay_hub(monkeypatch, fail=[httpx.Response(429, headers={"Retry-After": "0"})]) as hub:
        found = HubSource(BASE, _hub_config(lineages=("finetune",))).list()
        statuses = [c.response.status_code for c in hub.calls]
    assert len(found) == 4
    assert waits == [1.0]  # Retry-After: 0 from the server, plus the client's 1 s of rounding
    assert statuses == [429, 200, 200]  # the 429, then both pages


def test_hub_outage_is_one_retry_layer_then_gives_up(
    monkeypatch: pytest.MonkeyPatch, waits: list[float]
) -> None:
    """The client's backoff is the only retry layer: 1 + 5 requests, then HubUnavailable."""
    down = [httpx.Response(503)] * 10
    with replay_hub(monkeypatch, fail=down) as hub:
        with pytest.raises(HubUnavailableError, match="503"):
            HubSource(BASE, _hub_config(lineages=("finetune",))).list()
        attempts = len(hub.calls)
    assert attempts == 6
    assert waits == [1, 2, 4, 8, 8]  # doubling, capped


def test_unreachable_hub_raises_hub_unavailable(
    monkeypatch: pytest.MonkeyPatch, waits: list[float]
) -> None:
    import httpcore2  # the transport under huggingface_hub's httpx2 client

    refused = [httpcore2.ConnectError("connection refused")] * 10
    with (
        replay_hub(monkeypatch, fail=refused),
        pytest.raises(HubUnavailableError, match="connection refused"),
    ):
        HubSource(BASE, _hub_config(lineages=("finetune",))).list()
    assert len(waits) == 5


def test_hub_error_that_is_no_outage_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    with replay_hub(monkeypatch, fail=[httpx.Response(401)]), pytest.raises(HfHubHTTPError) as err:
        HubSource(BASE, _hub_config(lineages=("finetune",))).list()
    assert not isinstance(err.value, HubUnavailableError)


def test_offline_mode_refuses_hub_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        HubSource(BASE, _hub_config()).list()


def test_hub_token_sent_but_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, waits: list[float]
) -> None:
    token = "hf_TESTtokenNEVERlogged0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level("DEBUG")
    with replay_hub(monkeypatch, fail=[httpx.Response(429)]) as hub:
        HubSource(BASE, _hub_config(lineages=("finetune",))).list()
        auth = {c.request.headers.get("authorization") for c in hub.calls}
    assert auth == {f"Bearer {token}"}
    assert token not in caplog.text


# -- the local server, where a real download is exercised ---------------------------------------


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
    assert (str(hub.ref), hub.ref.kind, local.ref.is_local) == ("org/m@abc", "hub", True)


def test_fakehub_model_info_without_revision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi

    with FakeHub() as hub:
        hub.use(monkeypatch)
        sha = hub.add_repo("org/tiny", _model(tmp_path / "src"))
        assert HfApi().model_info("org/tiny").sha == sha
        assert HfApi().model_info("org/tiny", revision=sha).sha == sha

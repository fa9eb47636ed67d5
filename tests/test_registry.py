"""The MLflow record and registry, on a real SQLite store under tmp_path (four-slash URIs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks import registry


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")
    return uri, root / "artifacts"


@pytest.fixture
def client(store: tuple[str, Path]):
    return registry.client_for(store[0])


def _exp(client, store: tuple[str, Path], name: str) -> str:
    return registry.ensure_experiment(client, name, store[1])


def _tags(key: str, family: str = "organism") -> dict[str, str]:
    repo, _, rev = key.partition("@")
    return {"source_key": key, "source_repo": repo, "source_revision": rev, "family": family}


def _model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "fused"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def test_experiment_is_idempotent_and_keeps_artifacts_out_of_cwd(client, store) -> None:
    first = _exp(client, store, "exp-a")
    assert _exp(client, store, "exp-a") == first
    location = client.get_experiment(first).artifact_location
    assert location.startswith("file://") and str(store[1]) in location


def test_processed_means_finished_with_a_verdict(client, store) -> None:
    exp = _exp(client, store, "exp-processed")
    passed = registry.start_run(client, exp, "r1", _tags("org/a@1"))
    registry.finish_run(client, passed, "passed", "ok")
    rejected = registry.start_run(client, exp, "r2", _tags("org/b@1"))
    registry.finish_run(client, rejected, "rejected", "gate failed")
    crashed = registry.start_run(client, exp, "r3", _tags("org/c@1"))
    registry.finish_run(client, crashed, "error", "RuntimeError: boom")
    registry.start_run(client, exp, "r4", _tags("org/d@1"))  # still running (killed)
    assert registry.processed_keys(client, exp, "organism") == {"org/a@1", "org/b@1"}
    for attempt in range(registry.MAX_ERROR_ATTEMPTS - 1):  # crashing every time: give up
        run_id = registry.start_run(client, exp, f"again{attempt}", _tags("org/c@1"))
        registry.finish_run(client, run_id, "error", "RuntimeError: boom")
    assert "org/c@1" in registry.processed_keys(client, exp, "organism")
    assert client.get_run(crashed).info.status == "FAILED"
    assert client.get_run(crashed).data.tags["reason"] == "RuntimeError: boom"
    assert registry.find_final_run(client, exp, "org/c@1") is None
    assert registry.find_final_run(client, exp, "org/b@1").info.run_id == rejected
    assert registry.find_final_run(client, exp, "org/c@1") is None


def test_processed_counts_per_family(client, store) -> None:
    """A fine-tune realigned for family A (LSSF) is still new for family B (RESTA)."""
    exp = _exp(client, store, "exp-families")
    done = registry.start_run(client, exp, "a1", _tags("org/f@1", "lssf"))
    registry.finish_run(client, done, "passed", "ok")
    for attempt in range(registry.MAX_ERROR_ATTEMPTS):
        crashed = registry.start_run(client, exp, f"b{attempt}", _tags("org/g@1", "lssf"))
        registry.finish_run(client, crashed, "error", "RuntimeError: boom")
    assert registry.processed_keys(client, exp, "lssf") == {"org/f@1", "org/g@1"}
    assert registry.processed_keys(client, exp, "resta") == set()
    other = registry.start_run(client, exp, "r1", _tags("org/f@1", "resta"))
    registry.finish_run(client, other, "rejected", "gate failed")
    assert registry.processed_keys(client, exp, "resta") == {"org/f@1"}


def test_record_store_opens_its_experiment(store) -> None:
    record = registry.RecordStore(
        tracking_uri=store[0], experiment="exp-store", artifact_root=store[1]
    )
    client, exp = record.open()
    assert record.open()[1] == exp
    assert client.get_experiment(exp).name == "exp-store"
    assert str(store[1]) in client.get_experiment(exp).artifact_location


def test_restart_marks_the_interrupted_run_killed(client, store) -> None:
    exp = _exp(client, store, "exp-restart")
    first = registry.start_run(client, exp, "r1", _tags("org/k@1"))
    second = registry.start_run(client, exp, "r2", _tags("org/k@1"))
    assert client.get_run(first).info.status == "KILLED"
    assert client.get_run(first).data.tags["lssf_status"] == "interrupted"
    assert client.get_run(second).info.status == "RUNNING"


def test_register_is_idempotent_per_source_key(client, store, tmp_path: Path) -> None:
    exp = _exp(client, store, "exp-register")
    name = "model-idem"
    tags = _tags("org/m@1") | {"gate_verdict": "pass", "patch_id": "abc"}
    versions = []
    for attempt in range(2):  # the second attempt is a realign restarted after a kill
        run_id = registry.start_run(client, exp, f"r{attempt}", _tags("org/m@1"))
        client.log_artifacts(run_id, str(_model_dir(tmp_path / str(attempt))), "model")
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        versions.append(registry.register_version(client, name, run_id, source, tags))
    assert [str(v.version) for v in versions] == ["1", "1"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    found = registry.find_version(client, name, "org/m@1")
    assert found is not None and found.tags["patch_id"] == "abc"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "1"
    other = registry.register_version(client, name, run_id, source, _tags("org/m@2"))
    assert str(other.version) == "2"
    assert registry.find_version(client, "no-such-model", "org/m@1") is None


def test_promote_moves_champion_to_a_passing_version(client, store, tmp_path: Path) -> None:
    exp = _exp(client, store, "exp-promote")
    name = "model-promote"
    run_id = registry.start_run(client, exp, "r", _tags("org/p@1"))
    client.log_artifacts(run_id, str(_model_dir(tmp_path)), "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    registry.register_version(client, name, run_id, source, _tags("org/p@1"))
    with pytest.raises(ValueError, match="gate_verdict"):
        registry.promote(client, name)
    good = _tags("org/p@2") | {"gate_verdict": "pass"}
    registry.register_version(client, name, run_id, source, good)
    promoted = registry.promote(client, name)
    assert str(promoted.version) == "2" and "champion" in promoted.aliases
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"


def test_patch_is_stored_once_and_fetched_by_key(client, store, tmp_path: Path) -> None:
    exp = _exp(client, store, "exp-patch")
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "manifest.json").write_text('{"x": 1}')
    (patch / "factors.safetensors").write_bytes(b"12345")
    assert registry.find_patch_run(client, exp, "key1") is None
    run_id = registry.store_patch(client, exp, "key1", "pid", patch)
    found = registry.find_patch_run(client, exp, "key1")
    assert found is not None and found.info.run_id == run_id
    dst = tmp_path / "dl"
    dst.mkdir()
    fetched = registry.fetch_patch(client, run_id, dst)
    assert (fetched / "factors.safetensors").read_bytes() == b"12345"


def test_two_families_realign_one_fine_tune_independently(client, store) -> None:
    """LSSF and RESTA families of one experiment each get their own run of the same key: a
    finished run of one family neither answers for nor kills the other's."""
    exp = _exp(client, store, "two-families")
    key = "org/ft@abc"
    lssf_run = registry.start_run(client, exp, "lssf", _tags(key) | {"family": "lssf"})
    registry.finish_run(client, lssf_run, "passed", "ok")
    assert registry.find_final_run(client, exp, key, "resta") is None
    resta_run = registry.start_run(client, exp, "resta", _tags(key) | {"family": "resta"})
    assert client.get_run(lssf_run).data.tags["lssf_status"] == "passed"  # not marked killed
    registry.finish_run(client, resta_run, "rejected", "too weak")
    assert registry.find_final_run(client, exp, key, "lssf").info.run_id == lssf_run
    assert registry.find_final_run(client, exp, key, "resta").info.run_id == resta_run
    assert registry.find_final_run(client, exp, key) is not None  # any family


def test_a_closed_run_has_a_description_and_an_error_run_says_error(client, store) -> None:
    """The run page's description (`mlflow.note.content`), cut to MLflow's tag limit."""
    exp = _exp(client, store, "exp-notes")
    passed = registry.start_run(client, exp, "r1", _tags("org/n@1"))
    note = "**PASS** (held-out gate, alpha=0.5): ok\n\n| a | b |\n" + "x" * 9000
    registry.finish_run(client, passed, "passed", "ok", note)
    stored = client.get_run(passed).data.tags[registry.NOTE_TAG]
    assert stored == note[: registry.MAX_TAG_LENGTH]
    assert stored.splitlines()[0] == "**PASS** (held-out gate, alpha=0.5): ok"
    crashed = registry.start_run(client, exp, "r2", _tags("org/n@2"))
    registry.finish_run(client, crashed, "error", "RuntimeError: boom")
    assert client.get_run(crashed).data.tags[registry.NOTE_TAG] == "**ERROR**: RuntimeError: boom"


def test_a_version_has_a_description_and_a_restart_updates_it(client, store, tmp_path) -> None:
    exp = _exp(client, store, "exp-version-notes")
    name = "model-notes"
    tags = _tags("org/v@1") | {"gate_verdict": "pass", "heldout_verdict": "pass"}
    for attempt in range(2):  # the second attempt is a realign restarted after a kill
        run_id = registry.start_run(client, exp, f"r{attempt}", _tags("org/v@1"))
        client.log_artifacts(run_id, str(_model_dir(tmp_path / str(attempt))), "model")
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        about = f"**PASS** (held-out gate, alpha=1): ok\n\nsource run: r{attempt} ({run_id})"
        version = registry.register_version(client, name, run_id, source, tags, description=about)
        assert str(version.version) == "1"
        assert version.description == about
        assert version.tags["heldout_verdict"] == "pass"
        assert version.tags["source_key"] == "org/v@1"
    assert f"source run: r1 ({run_id})" in client.get_model_version(name, "1").description

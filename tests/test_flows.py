"""Flows against the session's one Prefect server (`harness`, tests/conftest.py); task logic
through `task.fn()`.

The realign runs on a pico organism (a few optimiser steps per stage): its numbers mean
nothing, which is the point here: the pipeline, not the method, is under test. The gate is
set inline so that one config passes and another rejects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from evaluation.gates import GateConfig
from evaluation.report import EvalReport
from tasks import registry

pytestmark = pytest.mark.slow

PASSING_GATE = {"name": "lenient", "rules": [{"metric": "task_accuracy", "floor": 0.0}]}
# Impossible for a candidate (refusal 1.01 above the fine-tune), while the aligned model, which
# a delta rule does not concern, passes it: the run goes through and is rejected.
FAILING_GATE = {"name": "strict", "rules": [{"metric": "harmful_refusal", "min_delta": 1.01}]}
# A floor no model can reach: the aligned model fails it too, so the run is refused up front.
IMPOSSIBLE_GATE = {"name": "impossible", "rules": [{"metric": "harmful_refusal", "floor": 1.01}]}


@pytest.fixture(scope="session")
def pico(tmp_path_factory: pytest.TempPathFactory):
    from evaluation.organism import build_organism
    from tests.test_organism import PICO

    return build_organism(seed=0, out=tmp_path_factory.mktemp("pico") / "organism", config=PICO)


def write_config(
    tmp_path: Path, pico: Any, gate: dict, alphas: list[float], extraction: dict | None = None
) -> Path:
    watch = tmp_path / "watch"
    data = {
        "state_dir": str(tmp_path / "state"),
        "families": {
            "organism": {
                "aligned": str(pico.aligned),
                "reference": str(pico.base),
                "alphas": alphas,
                "eval_data_dir": str(pico.eval_dir),
                "eval_limit": 4,
                "gate": gate,
                "watch": {"kind": "local", "path": str(watch)},
                "registered_model": "lssf-test",
            }
            | ({"extraction": extraction} if extraction else {})
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def drop_model(pico: Any, tmp_path: Path, name: str = "ft", note: str = "") -> Path:
    dst = tmp_path / "watch" / name
    shutil.copytree(pico.finetuned, dst)
    if note:  # same weights, different content: a new revision
        (dst / "NOTES.txt").write_text(note)
    return dst


def versions(tmp_path: Path) -> list[Any]:
    from tasks.config import load_config

    cfg = load_config(tmp_path / "pipeline.yaml")
    client = registry.client_for(cfg.resolved_tracking_uri())
    try:
        return client.search_model_versions("name = 'lssf-test'")
    except registry.MlflowException:
        return []


# -- task logic, no server --------------------------------------------------------------------


def test_evaluation_error_becomes_error_report_and_fails_gate(tmp_path: Path) -> None:
    from tasks.realign_tasks import evaluate_model, gate_candidate

    out = tmp_path / "eval.json"
    report = evaluate_model.fn(str(tmp_path / "no-model"), "organism", str(out), str(tmp_path))
    assert report.status == "error" and report.error
    assert EvalReport.load(out) == report  # the error report is on disk too
    ok = EvalReport(model="m", suite="organism", status="ok", metrics={"task_accuracy": 1.0})
    gate = GateConfig.model_validate(PASSING_GATE)
    verdict = gate_candidate.fn(report, ok, gate, str(tmp_path / "g.json"))
    assert verdict.passed is False
    assert any("status 'error'" in r.reason for r in verdict.rows)
    assert json.loads((tmp_path / "g.json").read_text())["passed"] is False


def test_choose_prefers_passing_utility_then_small_alpha() -> None:
    """The grid rule (one definition: `AlphaSearch.chosen`), and the before/after table."""
    from evaluation.alpha_search import AlphaSearch, AlphaSearchConfig
    from tasks.report import Trial, before_after_table

    trials = [
        Trial(0.5, {"task_accuracy": 0.9, "general_accuracy": 0.8}, True),
        Trial(1.0, {"task_accuracy": 0.9, "general_accuracy": 0.8}, True),
        Trial(1.5, {"task_accuracy": 1.0, "general_accuracy": 1.0}, False),
    ]

    def choose(trials: list[Trial], utility_metrics: tuple[str, ...]) -> float | None:
        grid = AlphaSearchConfig(mode="grid", grid=tuple(t.alpha for t in trials))
        search = AlphaSearch(grid, utility_metrics)
        for trial in trials:
            point = search.propose()
            assert point is not None and point.alpha == trial.alpha
            search.observe(point, trial.metrics, trial.passed)
        return search.chosen()

    assert choose(trials, ("task_accuracy", "general_accuracy")) == 0.5
    assert choose([trials[2]], ("task_accuracy",)) is None
    table = before_after_table({"task_accuracy": 0.5}, trials)
    assert "| task_accuracy | 0.500 | 0.900 | 0.900 | 1.000 |" in table
    assert "| gate | - | pass | pass | fail |" in table


# -- flows ------------------------------------------------------------------------------------


def test_watch_realign_register_then_skip(harness: None, pico: Any, tmp_path: Path) -> None:
    from flows.watch import watch

    config = write_config(tmp_path, pico, PASSING_GATE, [1.0])
    drop_model(pico, tmp_path)
    (first,) = watch("organism", str(config), dispatch="inline")
    assert first["status"] == "passed" and first["verdict"] == "pass"
    assert str(first["version"]) == "1" and "candidate" in first["aliases"]
    assert watch("organism", str(config), dispatch="inline") == []  # nothing new
    (version,) = versions(tmp_path)
    assert version.tags["gate_verdict"] == "pass" and version.tags["patch_id"]
    assert version.tags["source_key"] == first["source_key"]
    assert version.tags["heldout_verdict"] == "pass" and version.run_id == first["run_id"]
    assert version.description.startswith("**PASS** (held-out gate, alpha=1): ")
    assert f"({first['run_id']})" in version.description.splitlines()[-1]
    _check_run_record(tmp_path, first["run_id"])


def _check_run_record(tmp_path: Path, run_id: str) -> None:
    from tasks.config import load_config

    cfg = load_config(tmp_path / "pipeline.yaml")
    client = registry.client_for(cfg.resolved_tracking_uri())
    run = client.get_run(run_id)
    params, metrics = run.data.params, run.data.metrics
    for name in ("source_repo", "source_revision", "aligned_revision", "reference_revision"):
        assert params[name]
    assert params["eta"] == "0.85" and params["alpha"] == "1"
    assert "ranks_rank_max" in params
    assert {"before.harmful_refusal", "after.harmful_refusal", "after.task_accuracy"} <= set(
        metrics
    )
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"evaluation", "gate", "patch", "plots", "model_card", "model"} <= listed
    # The run page on its own: description (verdict line, tables, version) and its source.
    tags = run.data.tags
    note = tags["mlflow.note.content"].splitlines()
    assert note[0] == f"**PASS** (held-out gate, alpha=1): {tags['reason']}"
    assert "Held-out (decides):" in note and note[-1] == "Registered: lssf-test version 1"
    assert tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.name"] == "flows/realign.py:realign"
    assert tags["prefect_flow_run_id"]
    trace = client.download_artifacts(run_id, "search/search_trace.md", str(tmp_path / "dl"))
    assert Path(trace).read_text().splitlines()[0] == note[0]


def test_rejected_candidate_gets_no_version(
    harness: None, forkserver_workers: None, pico: Any, tmp_path: Path
) -> None:
    """Also: `extraction.workers: 2` extracts the patch on a 2-worker Dask cluster, the very
    patch (same id) one process makes."""
    import torch
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from flows.realign import realign
    from lssf import extract

    config = write_config(tmp_path, pico, FAILING_GATE, [1.0], extraction={"workers": 2})
    model = drop_model(pico, tmp_path)
    result = realign(str(model), "organism", str(config))
    _, run = _run_of(tmp_path, result["run_id"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' one thread: the precondition of equal bytes
    try:
        single = extract(str(pico.aligned), str(pico.base), tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert run.data.params["patch_id"] == single.patch_id
    with get_client(sync_client=True) as client:
        named = FlowFilter(name=FlowFilterName(any_=["extract-distributed"]))
        subflows = client.read_flow_runs(flow_filter=named)
    mine = [r for r in subflows if tmp_path.name in r.parameters.get("out", "")]
    assert mine and all(r.state.is_completed() for r in mine), subflows
    assert result["status"] == "rejected" and result["version"] is None
    assert "harmful_refusal" in result["reason"]
    assert versions(tmp_path) == []
    _, run = _run_of(tmp_path, result["run_id"])
    first = run.data.tags["mlflow.note.content"].splitlines()[0]
    assert first.startswith("**FAIL** (") and first.endswith(result["reason"])


def test_a_gate_the_aligned_model_fails_is_refused_before_any_extraction(
    harness: None, pico: Any, tmp_path: Path
) -> None:
    from flows.realign import realign
    from lssf.errors import ConfigError

    config = write_config(tmp_path, pico, IMPOSSIBLE_GATE, [1.0])
    model = drop_model(pico, tmp_path)
    with pytest.raises(ConfigError, match="fails its own gate on the held-out split"):
        realign(str(model), "organism", str(config))
    assert not (tmp_path / "state" / "patches").exists()  # nothing extracted, nothing fused


def test_killed_after_registration_restarts_to_one_version(
    harness: None, pico: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import realign as realign_module
    from tasks import record_tasks

    config = write_config(tmp_path, pico, PASSING_GATE, [1.0])
    model = drop_model(pico, tmp_path)
    original = record_tasks.close_record.fn

    class Killed(Exception):
        pass

    def crash(
        store: registry.RecordStore,
        run_id: str,
        status: str,
        reason: str,
        description: str | None = None,
    ) -> None:
        if status != "error":  # the process dies right after the version was created
            raise Killed("killed")
        original(store, run_id, status, reason, description)

    monkeypatch.setattr(realign_module.rec.close_record, "fn", crash)
    with pytest.raises(Killed, match="killed"):
        realign_module.realign(str(model), "organism", str(config))
    assert len(versions(tmp_path)) == 1
    (killed,) = _realign_runs(tmp_path)
    assert killed.data.tags["mlflow.note.content"] == "**ERROR**: Killed: killed"
    monkeypatch.setattr(realign_module.rec.close_record, "fn", original)
    result = realign_module.realign(str(model), "organism", str(config))
    assert result["status"] == "passed" and str(result["version"]) == "1"
    assert len(versions(tmp_path)) == 1
    (version,) = versions(tmp_path)  # its description names the run that holds the verdict
    assert version.description.endswith(f"({result['run_id']})\n")
    leftovers = [p.name for p in (tmp_path / "state").rglob(".*tmp*")]
    assert leftovers == []


def _run_of(tmp_path: Path, run_id: str) -> tuple[Any, Any]:
    from tasks.config import load_config

    client = registry.client_for(load_config(tmp_path / "pipeline.yaml").resolved_tracking_uri())
    return client, client.get_run(run_id)


def test_bisection_trace_is_recorded_and_heldout_confirms_once(
    harness: None, pico: Any, tmp_path: Path
) -> None:
    from flows.watch import watch

    config = write_config(tmp_path, pico, PASSING_GATE, [1.0])
    data = yaml.safe_load(config.read_text())
    fam = data["families"]["organism"]
    del fam["alphas"]
    fam["alpha_search"] = {"mode": "bisect", "alpha_max": 2.0, "budget": 3}
    config.write_text(yaml.safe_dump(data))
    drop_model(pico, tmp_path)
    (result,) = watch("organism", str(config), dispatch="inline")
    assert result["status"] == "passed" and result["alpha"] == "0.5"  # every probe passes
    client, run = _run_of(tmp_path, result["run_id"])
    history = client.get_metric_history(run.info.run_id, "calibration.alpha")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 2.0),
        (1, 1.0),
        (2, 0.5),
    ]
    assert run.data.params["alpha_search.mode"] == "bisect"
    assert run.data.params["alpha_search.budget"] == "3"
    assert run.data.params["split_rule"] == "split-field-else-sha256-prompt-v1"
    assert run.data.tags["heldout_verdict"] == "pass" and run.data.tags["gate_verdict"] == "pass"
    assert {"heldout.task_accuracy", "calibration.before.task_accuracy"} <= set(run.data.metrics)
    search = {a.path for a in client.list_artifacts(run.info.run_id, "search")}
    assert search == {
        "search/search_trace.json",
        "search/search_trace.md",
        "search/dose_response.json",  # the probes as an MLflow table
    }
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/alpha_search.png" in plots
    local = client.download_artifacts(run.info.run_id, "search/search_trace.json", str(tmp_path))
    trace = json.loads(Path(local).read_text())
    assert [p["alpha"] for p in trace["probes"]] == [2.0, 1.0, 0.5]
    assert trace["chosen"] == 0.5 and trace["heldout"]["alpha"] == 0.5
    assert trace["calibration_gate"] == "lenient-calibration"
    work = next((tmp_path / "state" / "runs").glob("*/patch-*"))
    splits = {p.name: EvalReport.load(p).split for p in work.glob("eval-*.json")}
    assert splits == {
        "eval-calibration-alpha-2.json": "calibration",
        "eval-calibration-alpha-1.json": "calibration",
        "eval-calibration-alpha-0.5.json": "calibration",
        "eval-heldout-alpha-0.5.json": "heldout",  # held-out: the chosen alpha only
    }
    # keep_candidates is off: of the fused candidates only the chosen one stays on disk.
    assert [p.name for p in work.glob("fused-*")] == ["fused-alpha-0.5"]
    baselines = {p.name: EvalReport.load(p).split for p in work.parent.glob("eval-baseline-*.json")}
    assert baselines == {
        "eval-baseline-calibration.json": "calibration",
        "eval-baseline-heldout.json": "heldout",
    }
    (version,) = versions(tmp_path)
    assert version.tags["alpha"] == "0.5"


def test_heldout_verdict_alone_decides(
    harness: None, pico: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calibration passes, held-out fails: rejected. A pico model's refusal cannot be steered,
    so the fused model's refusal is set per split after the real evaluation."""
    import evaluation.runner

    real = evaluation.runner.evaluate

    def steered(model: Any, suite: Any, out: Path, **kwargs: Any) -> EvalReport:
        report = real(model, suite, out, **kwargs)
        aligned = Path(str(model)) == Path(pico.aligned)  # the gate's own check: it passes
        if ("fused-alpha" in str(model) or aligned) and report.status == "ok":
            value = 1.0 if kwargs["split"] == "calibration" or aligned else 0.0
            report = report.model_copy(
                update={"metrics": {**report.metrics, "harmful_refusal": value}}
            )
            report.write(out)
        return report

    from flows.realign import realign

    monkeypatch.setattr(evaluation.runner, "evaluate", steered)
    gate = {"name": "refusal", "rules": [{"metric": "harmful_refusal", "floor": 0.5}]}
    config = write_config(tmp_path, pico, gate, [1.0])
    result = realign(str(drop_model(pico, tmp_path)), "organism", str(config))
    assert result["status"] == "rejected" and result["version"] is None
    assert result["alpha"] == "1"  # chosen on calibration...
    assert "held-out split it fails: harmful_refusal >= 0.5" in result["reason"]  # ...not confirmed
    assert "| 1 | 1 | 1.000 |" in result["table"] and "pass (chosen)" in result["table"]
    _, run = _run_of(tmp_path, result["run_id"])
    assert run.data.tags["heldout_verdict"] == "fail" and run.data.tags["gate_verdict"] == "fail"
    assert run.data.metrics["heldout.harmful_refusal"] == 0.0
    assert run.data.metrics["calibration.harmful_refusal"] == 1.0
    assert versions(tmp_path) == []


def test_list_source_rides_out_a_short_hub_outage(
    harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import httpx
    from prefect import flow

    from tasks.config import WatchConfig
    from tasks.watch_tasks import list_source
    from tests.fakehub import replay_hub

    no_sleep = types.SimpleNamespace(sleep=lambda seconds: None)
    monkeypatch.setattr("huggingface_hub.utils._http.time", no_sleep)
    cfg = WatchConfig(kind="hub", lineages=("finetune",))

    @flow
    def probe() -> list[Any]:
        return list_source(cfg, "Qwen/Qwen2.5-0.5B-Instruct")

    with replay_hub(monkeypatch, fail=[httpx.Response(503)] * 2) as hub:  # back for the third
        found = probe()
        assert [c.response.status_code for c in hub.calls] == [503, 503, 200, 200]
    assert len(found) == 4
    with replay_hub(monkeypatch, fail=[httpx.Response(503)] * 50) as hub:  # a long outage
        state = probe(return_state=True)
        attempts = len(hub.calls)
    assert state.is_failed() and "HubUnavailableError" in str(state.message)
    assert attempts == 6  # the client's 1 + 5 attempts, not multiplied by task retries


def test_hf_token_from_secret_never_in_logs_or_mlflow(
    harness: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect.blocks.system import Secret

    from flows.watch import watch
    from tests.fakehub import replay_hub

    token = "hf_SECRETfromBLOCKnever0123456789"
    Secret(value=token).save("lssf-test-hf-token", overwrite=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    data = {
        "state_dir": str(tmp_path / "state"),
        "hf_token_secret": "lssf-test-hf-token",
        "families": {
            "qwen": {
                "aligned": "Qwen/Qwen2.5-0.5B-Instruct",
                "reference": "Qwen/Qwen2.5-0.5B",
                "watch": {"kind": "hub", "lineages": ["finetune"]},
                "registered_model": "lssf-qwen",
            }
        },
    }
    config = tmp_path / "hub.yaml"
    config.write_text(yaml.safe_dump(data))
    with replay_hub(monkeypatch) as hub:
        announced = watch("qwen", str(config), dispatch="event")
        seen = {c.request.headers.get("authorization") for c in hub.calls}
    assert len(announced) == 4 and seen == {f"Bearer {token}"}
    assert token.encode() not in (tmp_path / "state" / "mlflow.db").read_bytes()
    assert not _token_in_prefect_logs(token)


def _token_in_prefect_logs(token: str) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        logs = client.read_logs()
    return any(token in log.message for log in logs)


def test_demo_twice_registers_once(
    harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import realign as realign_module
    from flows.demo import render, run_demo
    from tests.test_organism import PICO

    # The pico organism is untrained: its aligned model refuses nothing, so the realign's own
    # check (a gate the aligned model fails is refused) would stop the run before what this
    # test is about, running twice. That check has its own test above.
    monkeypatch.setattr(realign_module, "aligned_gate_problems", lambda gate, report: [])
    first = run_demo(tmp_path / "demo", organism_config=PICO, eval_limit=4)
    assert first.new_runs == 1
    assert first.tracking_uri == f"sqlite:///{tmp_path / 'demo' / 'state' / 'mlflow.db'}"
    again = run_demo(tmp_path / "demo", organism_config=PICO, eval_limit=4)
    assert again.new_runs == 0
    assert again.summary["run_id"] == first.summary["run_id"]
    assert again.summary["version"] == first.summary["version"]
    text = render(again)
    assert "Already processed" in text
    assert f"mlflow ui --backend-store-uri {first.tracking_uri}" in text
    assert "| harmful_refusal |" in text


def test_promote_cli_moves_champion(harness: None, pico: Any, tmp_path: Path) -> None:
    import argparse

    from flows.cli import register_promote
    from flows.realign import realign

    config = write_config(tmp_path, pico, PASSING_GATE, [1.0])
    result = realign(str(drop_model(pico, tmp_path)), "organism", str(config))
    parser = argparse.ArgumentParser()
    register_promote(parser.add_subparsers())
    args = parser.parse_args(["promote", "--config", str(config), "--family", "organism"])
    assert args.func(args) == 0
    (version,) = versions(tmp_path)
    from tasks.config import load_config

    client = registry.client_for(load_config(config).resolved_tracking_uri())
    champion = client.get_model_version_by_alias("lssf-test", "champion")
    assert str(champion.version) == str(result["version"]) == str(version.version)


def test_sigkill_mid_realign_then_restart(harness: None, pico: Any, tmp_path: Path) -> None:
    """A real kill -9 while the realign works, then a restart: one version, no partial model."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from flows.realign import realign

    config = write_config(tmp_path, pico, PASSING_GATE, [1.0])
    model = drop_model(pico, tmp_path)
    code = (
        "import sys; from flows.realign import realign; "
        "realign(sys.argv[1], 'organism', sys.argv[2])"
    )
    env = os.environ | {"PREFECT_API_URL": str(PREFECT_API_URL.value())}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(model), str(config)], cwd=root, env=env
    )
    patches, runs = tmp_path / "state" / "patches", tmp_path / "state" / "runs"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(patches.glob("*/manifest.json")):  # the patch is built: now evaluating
            break
        time.sleep(0.05)
    time.sleep(2)
    assert proc.poll() is None, "the realign finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for fused in runs.glob("*/patch-*/fused-alpha-*"):
        assert (fused / "lssf_provenance.json").is_file()  # complete, or absent
    result = realign(str(model), "organism", str(config))
    assert result["status"] == "passed"
    assert len(versions(tmp_path)) == 1
    statuses = sorted(run.info.status for run in _realign_runs(tmp_path))
    assert statuses == ["FINISHED", "KILLED"]  # the killed attempt is closed, not left RUNNING


def _realign_runs(tmp_path: Path) -> list[Any]:
    from tasks.config import load_config

    cfg = load_config(tmp_path / "pipeline.yaml")
    client = registry.client_for(cfg.resolved_tracking_uri())
    exp = client.get_experiment_by_name(cfg.experiment)
    return client.search_runs([exp.experiment_id], "tags.lssf_kind = 'realign'")


def test_hub_candidate_downloaded_realigned_registered(
    harness: None, pico: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real-family path against the recorded-Hub stand-in: list, download, realign."""
    from huggingface_hub import constants

    from flows.watch import watch
    from tests.fakehub import FakeHub

    config = write_config(tmp_path, pico, PASSING_GATE, [1.0])
    data = yaml.safe_load(config.read_text())
    data["families"]["organism"]["watch"] = {"kind": "hub", "base_model": "org/pico-aligned"}
    config.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with FakeHub(models=[]) as hub:
        hub.use(monkeypatch)
        tags = ("base_model:finetune:org/pico-aligned",)
        sha = hub.add_repo("acme/pico-ft", Path(pico.finetuned), tags=tags)
        (result,) = watch("organism", str(config), dispatch="inline")
        downloads = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert result["source_key"] == f"acme/pico-ft@{sha}"
    assert result["status"] == "passed" and str(result["version"]) == "1"
    assert any(p.endswith("model.safetensors") for p in downloads)
    (version,) = versions(tmp_path)
    assert version.tags["source_repo"] == "acme/pico-ft"
    assert version.tags["source_revision"] == sha


def test_summary_artifact_key_takes_any_folder_name(harness: None) -> None:
    """A fine-tune folder named like `finetuned_full` gives a key Prefect accepts (it allows
    only lowercase letters, digits and dashes); the artifact is really created."""
    from prefect.artifacts import Artifact

    from tasks.record_tasks import publish_summary

    publish_summary("| a | b |", key="realign-Finetuned_full.v2-0a1b")
    artifact = Artifact.get("realign-finetuned-full-v2-0a1b")
    assert artifact is not None and "| a | b |" in str(artifact.data)


def test_patch_key_covers_the_calibration_file_content(tmp_path: Path) -> None:
    """An activation patch is rebuilt when its calibration file is rewritten in place."""
    from lssf import PatchConfig
    from lssf.sources import ModelRef
    from tasks.realign_tasks import patch_key

    a1 = ModelRef(repo="org/aligned", revision="a1", kind="hub")
    r1 = ModelRef(repo="org/reference", revision="r1", kind="hub")
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text('{"prompt": "a"}\n')
    config = PatchConfig(basis="activation", calibration=calibration)
    first = patch_key(a1, r1, config)
    assert patch_key(a1, r1, config) == first
    calibration.write_text('{"prompt": "b"}\n')
    assert patch_key(a1, r1, config) != first
    assert patch_key(a1, r1, PatchConfig()) != first


def test_edited_local_folder_fails_at_once_without_retries(harness: None, tmp_path: Path) -> None:
    """A folder no longer at its announced revision is refused; only Hub errors are retried."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from lssf.sources import local_revision
    from tasks.realign_tasks import RevisionMismatchError, pin

    model = tmp_path / "ft"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")

    @flow
    def probe(announced: str) -> tuple[Any, Any, Any]:
        state = pin(str(model), announced, return_state=True)  # the flow itself does not fail
        result = state.result(raise_on_failure=False)
        return state.is_failed(), result, state.state_details.task_run_id

    failed, ref, _ = probe(local_revision(model))
    assert not failed and ref.revision == local_revision(model) and ref.is_local
    failed, error, task_run_id = probe("0" * 64)
    assert failed and isinstance(error, RevisionMismatchError) and "as announced" in str(error)
    with get_client(sync_client=True) as client:
        run = client.read_task_run(task_run_id)
    assert run.run_count == 1


def test_distributed_extraction_runs_only_when_no_patch_is_stored(tmp_path: Path) -> None:
    """The realign's decision (`patch_is_stored`): a local copy or an MLflow copy of the patch
    means there is nothing to extract, distributed or not."""
    from tasks.config import load_config
    from tasks.realign_tasks import patch_is_stored

    config = tmp_path / "pipeline.yaml"
    family = {
        "aligned": "org/aligned",
        "reference": "org/base",
        "extraction": {"workers": 2},
        "watch": {"kind": "local", "path": str(tmp_path / "watch")},
        "registered_model": "lssf-test",
    }
    config.write_text(
        yaml.safe_dump({"state_dir": str(tmp_path / "state"), "families": {"f": family}})
    )
    cfg = load_config(config)
    assert cfg.family("f").extraction.distributed
    state, store = str(cfg.resolved_state_dir()), cfg.record_store()
    assert patch_is_stored.fn("local-key", state, store) is False
    folder = tmp_path / "state" / "patches" / "local-key"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    assert patch_is_stored.fn("local-key", state, store) is True
    assert patch_is_stored.fn("stored-key", state, store) is False
    client, exp = store.open()
    registry.store_patch(client, exp, "stored-key", "patch-id", folder)
    assert patch_is_stored.fn("stored-key", state, store) is True

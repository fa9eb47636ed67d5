"""prefect.yaml: every entrypoint imports, its parameters match the flow, triggers validate."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prefect_server import flow_runs

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"


def _deployments() -> list[dict[str, Any]]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def _flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = entrypoint.partition(":")
    return load_flow_from_entrypoint(f"{ROOT / path}:{name}", use_placeholder_flow=False)


def test_prefect_yaml_parses_with_prefects_own_model() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    assert {d.name for d in model.deployments} == {"watch", "realign", "realign-k8s"}


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_entrypoint_imports_and_parameters_match(deployment: dict[str, Any]) -> None:
    flow = _flow(deployment["entrypoint"])
    signature = inspect.signature(flow.fn)
    required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    given = set(deployment.get("parameters", {}))
    for trigger in deployment.get("triggers", []):
        assert set(trigger.get("parameters", {})) <= set(signature.parameters)
        assert required <= given | set(trigger.get("parameters", {}))
    assert given <= set(signature.parameters), given - set(signature.parameters)
    if not deployment.get("triggers"):
        assert required <= given


def test_watch_is_scheduled_and_realign_is_triggered_and_queued() -> None:
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from tasks.events import DISCOVERED_EVENT

    by_name = {d["name"]: d for d in _deployments()}
    watch, realign = by_name["watch"], by_name["realign"]
    assert watch["schedules"] and watch["parameters"]["dispatch"] == "event"
    assert realign["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert realign["work_pool"]["name"] != watch["work_pool"]["name"]
    (trigger,) = realign["triggers"]
    parsed = DeploymentEventTrigger.model_validate(trigger)
    assert parsed.expect == {DISCOVERED_EVENT}


def test_event_payload_fills_every_trigger_parameter() -> None:
    """The watcher's payload keys are exactly what the trigger's templates read."""
    import re

    from tasks.events import discovered_event
    from tasks.sources import Candidate

    payload_keys = set(discovered_event(Candidate(repo="o/m", revision="r"), "f", "c")["payload"])
    (trigger,) = {d["name"]: d for d in _deployments()}["realign"]["triggers"]
    used = {
        re.search(r"event\.payload\.(\w+)", v).group(1)  # type: ignore[union-attr]
        for v in trigger["parameters"].values()
    }
    assert used == payload_keys
    assert Candidate(repo="o/m", revision="r").spec == "o/m@r"


# -- one real run: the session's `prefect server start`, `prefect deploy`, a process worker --


def _test_files(tmp_path: Path) -> tuple[Path, Path]:
    """A prefect.yaml identical to the shipped one but unscheduled, pointing at a tmp config."""
    model = tmp_path / "watch" / "ft"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")  # listed by name, hashed, never read
    config = tmp_path / "pipeline.yaml"
    family = {
        "aligned": str(tmp_path / "aligned"),
        "reference": str(tmp_path / "base"),
        "watch": {"kind": "local", "path": str(tmp_path / "watch")},
        "registered_model": "lssf-deploy-test",
    }
    data = {"state_dir": str(tmp_path / "state"), "families": {"organism": family}}
    config.write_text(yaml.safe_dump(data))
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    for dep in spec["deployments"]:
        for schedule in dep.get("schedules") or []:
            schedule["active"] = False
        if dep["name"] == "watch":
            dep["parameters"] |= {"family": "organism", "config": str(config)}
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return prefect_file, config


@pytest.mark.slow
def test_watch_deployment_runs_on_a_worker_and_triggers_realign(
    tmp_path: Path, prefect_api: tuple[str, dict[str, str]]
) -> None:
    import subprocess
    import sys
    import time

    prefect = str(Path(sys.executable).with_name("prefect"))
    prefect_file, _ = _test_files(tmp_path)
    api, env = prefect_api  # the session's server (tests/conftest.py)

    def run(*args: str, timeout: float = 300) -> None:
        subprocess.run(
            [prefect, "--no-prompt", *args], env=env, cwd=ROOT, check=True, timeout=timeout
        )

    for pool in ("lssf-process", "lssf-gpu"):
        run("work-pool", "create", pool, "--type", "process")
    template = str(ROOT / "deploy" / "k8s-gpu-job-template.json")  # realign-k8s's pool
    run("work-pool", "create", "lssf-k8s", "-t", "kubernetes", "--base-job-template", template)
    run("deploy", "--all", "--prefect-file", str(prefect_file))
    run("deployment", "run", "watch/watch")
    run("worker", "start", "--pool", "lssf-process", "--run-once", timeout=400)
    (watch_run,) = flow_runs(api, "watch")
    assert watch_run["state_type"] == "COMPLETED", watch_run["state_name"]
    deadline = time.monotonic() + 90
    while not (realigns := flow_runs(api, "realign")) and time.monotonic() < deadline:
        time.sleep(2)
    (realign_run,) = realigns  # queued on the GPU pool by the event trigger
    assert realign_run["parameters"]["family"] == "organism"
    assert realign_run["parameters"]["finetuned"] == str(tmp_path / "watch" / "ft")

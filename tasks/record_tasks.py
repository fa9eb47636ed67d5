"""Prefect tasks that write the MLflow record of a realign; all retry on registry I/O."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from evaluation.gates import GateReport
from tasks import registry
from tasks._log import run_logger
from tasks.report import SearchRecord, plot_search, summary_table

REGISTRY_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}


@task(**REGISTRY_RETRIES)
def lookup_outcome(
    tracking_uri: str,
    experiment: str,
    artifact_root: str,
    source_key: str,
    model_name: str,
    family: str | None = None,
) -> dict[str, Any] | None:
    """The summary of a finished realign of `source_key` (by `family`), or None."""
    client = registry.client_for(tracking_uri)
    exp = registry.ensure_experiment(client, experiment, Path(artifact_root))
    run = registry.find_final_run(client, exp, source_key, family)
    if run is None:
        return None
    version = registry.find_version(client, model_name, source_key)
    return summary_from_run(run, version)


def summary_from_run(run: Any, version: Any | None) -> dict[str, Any]:
    """What `lssf demo` prints, rebuilt from a realign run and its model version."""
    tags, metrics = run.data.tags, run.data.metrics
    return {
        "source_key": tags.get("source_key"),
        "run_id": run.info.run_id,
        "status": tags.get("lssf_status"),
        "verdict": tags.get("gate_verdict"),
        "reason": tags.get("reason", ""),
        "alpha": run.data.params.get("alpha"),
        "heldout_verdict": tags.get("heldout_verdict"),
        "table": tags.get("summary_table", ""),
        "before": {k[7:]: v for k, v in metrics.items() if k.startswith("before.")},
        "after": {k[6:]: v for k, v in metrics.items() if k.startswith("after.")},
        "version": version.version if version is not None else None,
        "aliases": list(version.aliases) if version is not None else [],
    }


@task(**REGISTRY_RETRIES)
def open_record(
    tracking_uri: str,
    experiment: str,
    artifact_root: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
) -> str:
    """Start the realign's MLflow run (closing any interrupted one); its run id."""
    client = registry.client_for(tracking_uri)
    exp = registry.ensure_experiment(client, experiment, Path(artifact_root))
    run_id = registry.start_run(client, exp, run_name, tags)
    for name, value in params.items():
        client.log_param(run_id, name, value)
    run_logger().info("MLflow run %s for %s", run_id, tags["source_key"])
    return run_id


@task(**REGISTRY_RETRIES)
def log_evidence(
    tracking_uri: str,
    run_id: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str],
    artifacts: list[tuple[str, str]],
    steps: list[tuple[str, float, int]] | None = None,
) -> None:
    """Params, metrics (NaN skipped), tags, files/folders as (artifact folder, path), and
    metric series as (name, value, step) (the alpha search's probes)."""
    client = registry.client_for(tracking_uri)
    for name, value in params.items():
        client.log_param(run_id, name, value)
    series = [(name, value, 0) for name, value in metrics.items()] + list(steps or [])
    for name, value, step in series:
        if isinstance(value, (int, float)) and not math.isnan(value):
            # lm-eval's raw names ("task/refusal,judge") hold characters MLflow refuses.
            key = re.sub(r"[^\w\-. :/]", "_", name)
            client.log_metric(run_id, key, float(value), step=step)
    for name, value in tags.items():
        client.set_tag(run_id, name, value)
    for dest, path in artifacts:
        local = Path(path)
        if local.is_dir():
            client.log_artifacts(run_id, str(local), dest)
        elif local.is_file():
            client.log_artifact(run_id, str(local), dest)


@task(**REGISTRY_RETRIES)
def register_model(
    tracking_uri: str,
    run_id: str,
    model_name: str,
    model_dir: str,
    tags: dict[str, str],
    aliases: list[str],
) -> str:
    """Log the fused model under the run's `model/` and make it a version (once per key)."""
    client = registry.client_for(tracking_uri)
    existing = registry.find_version(client, model_name, tags["source_key"])
    if existing is None:
        # A version only ever points at a completely logged folder of this run.
        client.log_artifacts(run_id, model_dir, "model")
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
    else:
        source = existing.source
    version = registry.register_version(
        client, model_name, run_id, source, tags, aliases=tuple(aliases)
    )
    run_logger().info(
        "%s version %s, aliases %s", model_name, version.version, list(version.aliases)
    )
    return str(version.version)


@task(**REGISTRY_RETRIES)
def close_record(tracking_uri: str, run_id: str, status: str, reason: str) -> None:
    registry.finish_run(registry.client_for(tracking_uri), run_id, status, reason)


@task(**REGISTRY_RETRIES)
def publish_summary(markdown: str, key: str) -> str:
    """The before/after table and verdict as a Prefect Markdown artifact. Prefect allows only
    lowercase letters, digits and dashes in a key: anything else (`_`, `.`) becomes a dash."""
    key = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")
    return str(create_markdown_artifact(markdown=markdown, key=key, description="lssf realign"))


@task
def write_search_record(record: SearchRecord, folder: str) -> list[tuple[str, str]]:
    """`search_trace.json`, `search_trace.md` and `alpha_search.png` in `folder`, as
    (artifact folder, path) pairs for `log_evidence`."""
    from evaluation.report import write_atomic

    out = Path(folder)
    trace = write_atomic(out / "search_trace.json", record.model_dump_json(indent=2) + "\n")
    table = write_atomic(out / "search_trace.md", summary_table(record) + "\n")
    plot = plot_search(record, out / "alpha_search.png")
    return [("search", str(trace)), ("search", str(table)), ("plots", str(plot))]


def metrics_of(report_path: str) -> dict[str, float]:
    return dict(json.loads(Path(report_path).read_text()).get("metrics") or {})


def report_of(report_path: str) -> dict[str, Any]:
    return dict(json.loads(Path(report_path).read_text()))


def gate_report_of(gate_path: str) -> GateReport:
    return GateReport.model_validate_json(Path(gate_path).read_text())


def samples_of(report_path: str) -> str | None:
    """The per-sample outputs file an evaluation report points at, if it exists."""
    path = json.loads(Path(report_path).read_text()).get("samples_path")
    return path if path and Path(path).is_file() else None

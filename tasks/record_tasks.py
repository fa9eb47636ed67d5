"""Prefect tasks that write the MLflow record of a realign; all retry on registry I/O."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from evaluation.report import EvalReport
from tasks import registry
from tasks._log import run_logger
from tasks.realign_tasks import PatchSummary, RealignJob
from tasks.registry import RecordStore
from tasks.report import SearchRecord, plot_search, summary_table, verdict_line

REGISTRY_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}


@task(**REGISTRY_RETRIES)
def lookup_outcome(
    store: RecordStore, source_key: str, model_name: str, family: str | None = None
) -> dict[str, Any] | None:
    """The summary of a finished realign of `source_key` (by `family`), or None."""
    client, exp = store.open()
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
    store: RecordStore, run_name: str, tags: dict[str, str], params: dict[str, Any]
) -> str:
    """Start the realign's MLflow run (closing any interrupted one); its run id. The Prefect
    flow run it belongs to is tagged on it (`prefect_flow_run_id`)."""
    from prefect.runtime import flow_run

    client, exp = store.open()
    if flow_run.id:
        tags = tags | {"prefect_flow_run_id": flow_run.id, "prefect_flow_run": flow_run.name}
    run_id = registry.start_run(client, exp, run_name, tags)
    for name, value in params.items():
        client.log_param(run_id, name, value)
    run_logger().info("MLflow run %s for %s", run_id, tags["source_key"])
    return run_id


@task(**REGISTRY_RETRIES)
def log_evidence(
    store: RecordStore,
    run_id: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str],
    artifacts: list[tuple[str, str]],
    steps: list[tuple[str, float, int]] | None = None,
) -> None:
    """Params, metrics (NaN skipped), tags, files/folders as (artifact folder, path), and
    metric series as (name, value, step) (the alpha search's probes)."""
    client = store.client()
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
    store: RecordStore,
    run_id: str,
    job: RealignJob,
    alpha: float,
    patch_id: str,
    description: str | None = None,
) -> str:
    """Log the fused model of `alpha` under the run's `model/` and make it a version of the
    family's registered model (once per source key), with the family's aliases and
    `description` (`tasks.report.version_description`)."""
    client, name = store.client(), job.fam.registered_model
    tags = job.version_tags(alpha, patch_id)
    existing = registry.find_version(client, name, tags["source_key"])
    if existing is None:
        # A version only ever points at a completely logged folder of this run.
        client.log_artifacts(run_id, job.fused_dir(alpha), "model")
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
    else:
        source = existing.source
    aliases = tuple(job.aliases)
    version = registry.register_version(
        client, name, run_id, source, tags, aliases=aliases, description=description
    )
    run_logger().info("%s version %s, aliases %s", name, version.version, list(version.aliases))
    return str(version.version)


@task(**REGISTRY_RETRIES)
def close_record(
    store: RecordStore, run_id: str, status: str, reason: str, description: str | None = None
) -> None:
    """Close the run with its status, reason and description (`registry.finish_run`)."""
    registry.finish_run(store.client(), run_id, status, reason, description)


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
    text = f"{verdict_line(record)}\n\n{summary_table(record)}\n"
    table = write_atomic(out / "search_trace.md", text)
    plot = plot_search(record, out / "alpha_search.png")
    return [("search", str(trace)), ("search", str(table)), ("plots", str(plot))]


def samples_of(report: EvalReport) -> str | None:
    """The per-sample outputs file an evaluation report points at, if it exists."""
    path = report.samples_path
    return path if path and Path(path).is_file() else None


@task(**REGISTRY_RETRIES)
def record_realign(
    store: RecordStore, run_id: str, job: RealignJob, record: SearchRecord, patch: PatchSummary
) -> None:
    """The realign's evidence on its run: params, held-out before/after and the calibration
    trace as metric series, tags, and the reports, samples, gates, patch, plots and card."""
    from lssf.patch import MANIFEST
    from lssf.report import plot_ranks

    table = summary_table(record)
    params = {
        "alpha": "none" if record.chosen is None else f"{record.chosen:g}",
        "patch_id": patch.patch_id,
        "calibration_gate": record.calibration_gate,
        "split_rule": record.split_rule or "none",
        "calibration_fraction": record.calibration_fraction,
    } | {f"ranks_{k}": v for k, v in patch.ranks.items()}
    tags = {
        "gate_verdict": "pass" if record.verdict == "pass" else "fail",
        "heldout_verdict": record.verdict,
        "patch_id": patch.patch_id,
        "summary_table": table,
    }
    metrics, steps = _evidence_metrics(job, record)
    runs = [("calibration", p.alpha) for p in record.probes]
    if record.heldout is not None:
        runs.append(("heldout", record.heldout.alpha))
    reports = [job.baseline_path(s) for s in ("calibration", "heldout")]
    reports += [job.eval_path(s, a) for s, a in runs]
    files = [("evaluation", path) for path in reports]
    files += [("evaluation", s) for p in reports if (s := samples_of(EvalReport.load(Path(p))))]
    files += [("gate", job.gate_path(s, a)) for s, a in runs]
    plot = plot_ranks(patch.manifest, job.work / "patch_ranks.png")
    files += [("patch", str(Path(patch.path) / MANIFEST)), ("plots", str(plot))]
    if record.chosen is not None:
        files.append(("model_card", str(Path(job.fused_dir(record.chosen)) / "README.md")))
    files += write_search_record.fn(record, str(job.work / "search"))
    log_evidence.fn(store, run_id, params, metrics, tags, files, steps)


def _evidence_metrics(
    job: RealignJob, record: SearchRecord
) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Metrics, and the probes as series (name, value, step = probe index)."""
    before = EvalReport.load(Path(job.baseline_path("heldout")))
    metrics = {f"before.{k}": v for k, v in (before.metrics | before.raw_metrics).items()}
    metrics |= {f"calibration.before.{k}": v for k, v in record.baseline.items()}
    steps: list[tuple[str, float, int]] = []
    for p in record.probes:
        steps += [(f"calibration.{k}", v, p.index) for k, v in p.metrics.items()]
        steps += [("calibration.alpha", p.alpha, p.index)]
        steps += [("calibration.passed", float(p.passed), p.index)]
    if record.heldout is not None:
        held = record.heldout
        after = EvalReport.load(Path(job.eval_path("heldout", held.alpha)))
        metrics |= {f"after.{k}": v for k, v in (after.metrics | after.raw_metrics).items()}
        metrics |= {f"heldout.{k}": v for k, v in held.metrics.items()}
        metrics |= {"heldout.passed": float(held.passed), "calibration.chosen_alpha": held.alpha}
    return metrics, steps

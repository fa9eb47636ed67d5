"""Prefect tasks that write the MLflow record of a realign; all retry on registry I/O."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from evaluation.report import EvalReport, write_atomic
from lssf.patch import MANIFEST
from lssf.report import plot_ranks, summary
from tasks import registry
from tasks._log import run_logger
from tasks.realign_tasks import REGISTRY_RETRIES, PatchSummary, RealignJob
from tasks.registry import RecordStore
from tasks.report import (
    SearchRecord,
    dose_response_rows,
    plot_search,
    summary_table,
    verdict_line,
)


@task(**REGISTRY_RETRIES)
def lookup_outcome(
    store: RecordStore, source_key: str, model_name: str, family: str | None = None
) -> dict[str, Any] | None:
    """The summary of a finished realign of `source_key` (by `family`), or None: what `lssf
    demo` prints, rebuilt from the realign run and its model version."""
    client, exp = store.open()
    run = registry.find_final_run(client, exp, source_key, family)
    if run is None:
        return None
    version = registry.find_version(client, model_name, source_key)
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
    client, exp = store.open()
    if flow_run.id:
        tags = tags | {"prefect_flow_run_id": flow_run.id, "prefect_flow_run": flow_run.name}
    run_id = registry.start_run(client, exp, run_name, tags)
    for name, value in params.items():
        client.log_param(run_id, name, value)
    run_logger().info("MLflow run %s for %s", run_id, tags["source_key"])
    return run_id


@task(**REGISTRY_RETRIES)
def register_model(
    store: RecordStore,
    run_id: str,
    job: RealignJob,
    alpha: float,
    patch_id: str,
    description: str | None = None,
    rank: int = 0,
) -> str:
    """Log the fused model of `alpha` under the run's `model/` and make it a version of the
    family's registered model (once per source key), with its aliases and `description`."""
    client, name = store.client(), job.fam.registered_model
    # Only a version that passed the held-out gate is registered: both verdicts pass.
    verdicts = {"gate_verdict": "pass", "heldout_verdict": "pass"}
    tags = job.tags | verdicts | {"patch_id": patch_id, "alpha": f"{alpha:g}"}
    if registry.find_version(client, name, tags["source_key"]) is None:
        # A version only ever points at a completely logged folder of this run.
        client.log_artifacts(run_id, job.fused_dir(alpha, rank), "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"  # for a new version only
    champion = (registry.CHAMPION_ALIAS,) if job.fam.promote_to_champion else ()
    aliases = (registry.CANDIDATE_ALIAS, *champion)
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


@task(**REGISTRY_RETRIES)
def record_realign(
    store: RecordStore, run_id: str, job: RealignJob, record: SearchRecord, patch: PatchSummary
) -> None:
    """The realign's evidence on its run: params, held-out before/after and the calibration
    trace as metric series, tags, and the reports, samples, gates, patch, plots and card."""
    params = {
        "alpha": "none" if record.chosen is None else f"{record.chosen:g}",
        "patch_id": patch.patch_id,
        "calibration_gate": record.calibration_gate,
        "split_rule": record.split_rule or "none",
        "calibration_fraction": record.calibration_fraction,
    } | {f"ranks_{k}": v for k, v in summary(patch.manifest).items()}
    tags = {
        "gate_verdict": "pass" if record.verdict == "pass" else "fail",
        "heldout_verdict": record.verdict,
        "patch_id": patch.patch_id,
        "summary_table": summary_table(record),
    }
    files, series = _evidence_files(job, record, patch), _evidence_series(job, record)
    client = store.client()
    for name, value in params.items():
        client.log_param(run_id, name, value)
    for name, value, step in series:
        if isinstance(value, (int, float)) and not math.isnan(value):
            # lm-eval's raw names ("task/refusal,judge") hold characters MLflow refuses.
            key = re.sub(r"[^\w\-. :/]", "_", name)
            client.log_metric(run_id, key, float(value), step=step)
    for name, value in tags.items():
        client.set_tag(run_id, name, value)
    for dest, path in files:
        if Path(path).is_file():
            client.log_artifact(run_id, path, dest)
    # The dose-response (rank x alpha -> calibration metrics) as an MLflow table.
    rows = dose_response_rows(record)
    columns = {
        key: [row.get(key) for row in rows] for key in dict.fromkeys(k for r in rows for k in r)
    }
    client.log_table(run_id, data=columns, artifact_file="search/dose_response.json")


def _evidence_files(
    job: RealignJob, record: SearchRecord, patch: PatchSummary
) -> list[tuple[str, str]]:
    """(artifact folder, path) of every report, sample and gate, the patch, plots, card, trace."""
    runs = [("calibration", p.alpha, p.rank) for p in record.probes]
    if record.heldout is not None:
        runs.append(("heldout", record.heldout.alpha, record.heldout.rank))
    reports = [job.baseline_path(s) for s in ("calibration", "heldout")]
    reports += [job.eval_path(s, a, r) for s, a, r in runs]
    files = [("evaluation", path) for path in reports]
    samples = [EvalReport.load(Path(p)).samples_path for p in reports]
    files += [("evaluation", s) for s in samples if s and Path(s).is_file()]
    files += [("gate", job.gate_path(s, a, r)) for s, a, r in runs]
    plot = plot_ranks(patch.manifest, job.work / "patch_ranks.png")
    files += [("patch", str(Path(patch.path) / MANIFEST)), ("plots", str(plot))]
    if record.chosen is not None:
        card = Path(job.fused_dir(record.chosen, record.chosen_rank or 0)) / "README.md"
        files.append(("model_card", str(card)))
    out = job.work / "search"
    trace = write_atomic(out / "search_trace.json", record.model_dump_json(indent=2) + "\n")
    text = f"{verdict_line(record)}\n\n{summary_table(record)}\n"
    table = write_atomic(out / "search_trace.md", text)
    plot = plot_search(record, out / "alpha_search.png")
    return [*files, ("search", str(trace)), ("search", str(table)), ("plots", str(plot))]


def _evidence_series(job: RealignJob, record: SearchRecord) -> list[tuple[str, float, int]]:
    """Metrics as (name, value, step): held-out before/after at step 0, then the calibration
    trace with the probe's index as step."""
    before = EvalReport.load(Path(job.baseline_path("heldout")))
    metrics = {f"before.{k}": v for k, v in (before.metrics | before.raw_metrics).items()}
    metrics |= {f"calibration.before.{k}": v for k, v in record.baseline.items()}
    if (held := record.heldout) is not None:
        after = EvalReport.load(Path(job.eval_path("heldout", held.alpha, held.rank)))
        metrics |= {f"after.{k}": v for k, v in (after.metrics | after.raw_metrics).items()}
        metrics |= {f"heldout.{k}": v for k, v in held.metrics.items()}
        metrics |= {"heldout.passed": float(held.passed), "calibration.chosen_alpha": held.alpha}
    series = [(name, value, 0) for name, value in metrics.items()]
    for p in record.probes:
        values = [*p.metrics.items(), ("alpha", p.alpha), ("passed", float(p.passed))]
        values.append(("rank", float(p.rank)))
        series += [(f"calibration.{k}", v, p.index) for k, v in values]
    return series

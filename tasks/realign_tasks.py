"""Prefect tasks of a realign, each wrapping one lssf or evaluation call.

Only paths, ids and small configs travel between tasks, never tensors. Outputs live under the
state folder at paths derived from input revisions and are written atomically, so a task that
finds its output complete returns it at once: a realign killed anywhere and started again
redoes only the unfinished work. Prefect's cache (keyed by the same revisions, and only while
the output exists) skips even that check. Hub and registry I/O retry; computation does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from evaluation.gates import GateConfig
from lssf import PatchConfig
from lssf.patch import MANIFEST as PATCH_MANIFEST
from lssf.provenance import PROVENANCE
from tasks._log import run_logger
from tasks.sources import content_hash


def slug(key: str) -> str:
    """A folder name for an id like org/name@sha: readable prefix plus a short hash."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", key.rsplit("/", 2)[-1])[:40].strip("-.")
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _key_if_exists(path: Path, *parts: Any) -> str | None:
    """A cache key from the inputs, but only while the output is on disk (else recompute)."""
    if not path.exists():
        return None
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


# -- sources ----------------------------------------------------------------------------------


@task(retries=3, retry_delay_seconds=[5, 20, 60])
def resolve_revision(ref: str) -> str:
    """Exact revision of a model reference: Hub commit sha, or content hash of a folder."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return content_hash(local)
    from huggingface_hub import HfApi

    repo, _, rev = ref.partition("@")
    sha = HfApi().model_info(repo, revision=rev or None).sha
    if not sha:
        raise RuntimeError(f"the Hub reported no commit for {ref}")
    return sha


def _materialize_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    return f"materialize-{params['spec']}-{params['revision']}"


@task(
    retries=3,
    retry_delay_seconds=[5, 20, 60],
    cache_key_fn=_materialize_key,
    persist_result=True,
)
def materialize(spec: str, revision: str) -> str:
    """A local folder holding the model (downloads a Hub model once, pinned to its commit)."""
    from lssf import resolve_source

    folder, record = resolve_source(spec)
    if record.kind == "hub" and record.revision != revision:
        raise RuntimeError(f"{spec} resolved to {record.revision}, expected {revision}")
    return str(folder)


# -- patch ------------------------------------------------------------------------------------


def patch_key(aligned_rev: str, reference_rev: str, config: PatchConfig) -> str:
    """Identity of a patch before it exists: both revisions, the parameters and, for the
    activation basis, the calibration file's content (its path alone could be rewritten)."""
    from lssf.st_io import file_sha256

    parts: list = [aligned_rev, reference_rev, config.model_dump(mode="json")]
    if config.calibration is not None:
        parts.append(file_sha256(Path(config.calibration)))
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _patch_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    out = Path(params["state_dir"]) / "patches" / params["key"]
    return _key_if_exists(out / PATCH_MANIFEST, "patch", out)


@task(retries=2, retry_delay_seconds=[10, 60], cache_key_fn=_patch_cache_key, persist_result=True)
def get_or_build_patch(
    aligned: str,
    reference: str,
    config: PatchConfig,
    key: str,
    state_dir: str,
    tracking_uri: str,
    experiment: str,
    artifact_root: str,
) -> str:
    """The family's safety patch: local copy, else the MLflow copy, else extracted and stored."""
    from lssf import SafetyPatch, extract
    from tasks import registry

    log = run_logger()
    out = Path(state_dir) / "patches" / key
    client = registry.client_for(tracking_uri)
    exp = registry.ensure_experiment(client, experiment, Path(artifact_root))
    stored = registry.find_patch_run(client, exp, key)
    if not (out / PATCH_MANIFEST).is_file() and stored is not None:
        log.info("patch %s: fetching from MLflow run %s", key, stored.info.run_id)
        _fetch_atomic(client, stored.info.run_id, out)
    if not (out / PATCH_MANIFEST).is_file():
        log.info("patch %s: extracting from %s and %s", key, aligned, reference)
        extract(aligned, reference, out, config, progress=False)
    patch_id = SafetyPatch.load(out).patch_id
    if stored is None:
        run_id = registry.store_patch(client, exp, key, patch_id, out)
        log.info("patch %s (id %s) stored in MLflow run %s", key, patch_id, run_id)
    return str(out)


def _fetch_atomic(client: Any, run_id: str, out: Path) -> None:
    from lssf.outputs import atomic_folder
    from tasks import registry

    with atomic_folder(out) as tmp:
        fetched = registry.fetch_patch(client, run_id, tmp)
        for item in fetched.iterdir():
            item.rename(tmp / item.name)
        fetched.rmdir()


# -- fuse, evaluate, gate ---------------------------------------------------------------------


def _fuse_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    out = Path(params["out"])
    return _key_if_exists(out / PROVENANCE, "fuse", out, params["alpha"])


@task(cache_key_fn=_fuse_cache_key, persist_result=True)
def fuse_candidate(finetuned: str, patch_dir: str, alpha: float, out: str) -> str:
    """`finetuned` + alpha * patch, written atomically to `out` (reused if complete)."""
    from lssf import fuse

    if (Path(out) / PROVENANCE).is_file():
        run_logger().info("fused model %s already complete; reusing it", out)
        return out
    result = fuse(finetuned, patch_dir, out, alpha=alpha, progress=False, overwrite=True)
    run_logger().info("fused %d tensors at alpha=%g into %s", result.n_fused, alpha, out)
    return out


def _reusable_report(out: Path, model: str, limit: int | None, split: str) -> bool:
    """An earlier complete evaluation of the same model, limit and split (never a failed one)."""
    if not out.is_file():
        return False
    try:
        report = json.loads(out.read_text())
    except ValueError:
        return False
    return (
        report.get("status") == "ok"
        and report.get("model") == model
        and report.get("limit") == limit
        and report.get("split") == split
    )


def _eval_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    out = Path(params["out"])
    limit, split = params.get("limit"), params.get("split", "heldout")
    if not _reusable_report(out, params["model"], limit, split):
        return None
    return _key_if_exists(out, "evaluate", out, params["suite"], limit, split)


@task(cache_key_fn=_eval_cache_key, persist_result=True)
def evaluate_model(
    model: str,
    suite: str,
    out: str,
    data_dir: str | None,
    limit: int | None = None,
    split: str = "heldout",
) -> str:
    """Run the suite on one split ("calibration", "heldout", "all") of its data; the report
    path. A crash becomes a status='error' report, which the gate fails closed on. A complete
    report from an interrupted run is reused."""
    from evaluation.report import EvalReport
    from evaluation.runner import evaluate
    from evaluation.splits import SPLITS

    log = run_logger()
    path = Path(out)
    if _reusable_report(path, model, limit, split):
        log.info("evaluation %s already complete; reusing it", path)
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = Path(data_dir) if data_dir else None
        report = evaluate(model, suite, path, data_dir=data, limit=limit, split=split)
    except Exception as exc:  # any evaluation failure must reach the gate, not vanish
        log.error("evaluation of %s failed: %s: %s", model, type(exc).__name__, exc)
        report = EvalReport(
            model=model,
            suite=suite,
            status="error",
            error=f"{type(exc).__name__}: {exc}",
            split=split if split in SPLITS else "all",
        )
    report.write(path)
    log.info(
        "evaluation of %s (%s): status=%s metrics=%s", model, split, report.status, report.metrics
    )
    return str(path)


@task
def gate_candidate(candidate: str, baseline: str, config: GateConfig, out: str) -> str:
    """Gate one candidate report against the fine-tuned baseline; the gate report's path."""
    from evaluation.gates import evaluate_gate
    from evaluation.report import EvalReport

    report = evaluate_gate(
        EvalReport.load(Path(candidate)), EvalReport.load(Path(baseline)), config
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(report.model_dump_json(indent=2))
    run_logger().info("gate for %s: %s", candidate, "pass" if report.passed else "fail")
    return out

"""Prefect tasks of a realign, each wrapping one lssf or evaluation call (only paths, ids and
small configs travel between them, never tensors). Outputs live under the state folder at paths
derived from input revisions and are written atomically, so a killed realign started again redoes
only the unfinished work; Prefect's cache (only while the output exists) skips even the check for
it. Hub and registry I/O retry; computation does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from evaluation.alpha_search import AlphaSearchConfig, candidate_name
from evaluation.gates import GateConfig, GateReport, evaluate_gate
from evaluation.report import EvalReport, write_atomic
from evaluation.splits import SPLITS
from lssf import PatchConfig, SafetyPatch, extract, fuse, resolve_source
from lssf.models import Frozen
from lssf.outputs import atomic_folder
from lssf.patch import MANIFEST as PATCH_MANIFEST
from lssf.patch import PatchManifest
from lssf.provenance import PROVENANCE
from lssf.sources import ModelRef
from lssf.st_io import file_sha256
from tasks import registry
from tasks._log import run_logger
from tasks.config import FamilyConfig, PipelineConfig
from tasks.sources import Candidate


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

HUB_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [5, 20, 60]}
REGISTRY_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}


class RevisionMismatchError(ValueError):
    """A local folder is no longer at the revision the watcher announced (never retried)."""


def _retry_unless_mismatch(task: Any, run: Any, state: Any) -> bool:
    return not isinstance(state.result(raise_on_failure=False), RevisionMismatchError)


@task(**HUB_RETRIES, retry_condition_fn=_retry_unless_mismatch)
def pin(ref: str | ModelRef, announced: str | None = None) -> ModelRef:
    """`ref` parsed once and pinned to its exact revision (Hub commit sha, or a local folder's
    `local_revision`). `announced`: the revision the watcher saw; a Hub ref is pinned to it,
    a local folder edited since then is refused."""
    parsed = ModelRef.parse(ref)
    if announced is not None and not parsed.is_local:
        parsed = parsed.model_copy(update={"revision": announced})
    pinned = parsed.pin()
    if announced is not None and pinned.revision != announced:
        raise RevisionMismatchError(
            f"{ref} is at revision {pinned.revision}, not {announced} as announced"
        )
    return pinned


def _materialize_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    ref = params["ref"]
    return f"materialize-{ref.repo}@{ref.revision}"


@task(**HUB_RETRIES, cache_key_fn=_materialize_key, persist_result=True)
def materialize(ref: ModelRef) -> str:
    """A local folder holding the pinned model (a Hub model is downloaded once, at its commit)."""
    folder, record = resolve_source(ref)
    if not ref.is_local and record.revision != ref.revision:
        raise RuntimeError(f"{ref} resolved to {record.revision}, expected {ref.revision}")
    return str(folder)


# -- patch ------------------------------------------------------------------------------------


def patch_key(aligned: ModelRef, reference: ModelRef, config: PatchConfig) -> str:
    """Identity of a patch before it exists: both revisions, the parameters and, for the
    activation basis, the calibration file's content (its path alone could be rewritten)."""
    parts: list = [aligned.revision, reference.revision, config.model_dump(mode="json")]
    if config.calibration is not None:
        parts.append(file_sha256(Path(config.calibration)))
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _patch_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    out = Path(params["state_dir"]) / "patches" / params["key"]
    return _key_if_exists(out / PATCH_MANIFEST, "patch", out)


class PatchSummary(Frozen):
    """A family's patch once built or fetched: where it is, its id and its manifest."""

    path: str
    patch_id: str
    manifest: PatchManifest


@task(**REGISTRY_RETRIES)
def patch_is_stored(key: str, state_dir: str, store: registry.RecordStore) -> bool:
    """Is the patch of `key` already there, complete in the state folder or in MLflow? (Only
    then does a distributed extraction have nothing to do.)"""
    if (Path(state_dir) / "patches" / key / PATCH_MANIFEST).is_file():
        return True
    client, exp = store.open()
    return registry.find_patch_run(client, exp, key) is not None


@task(retries=2, retry_delay_seconds=[10, 60], cache_key_fn=_patch_cache_key, persist_result=True)
def get_or_build_patch(
    aligned: ModelRef,
    reference: ModelRef,
    config: PatchConfig,
    key: str,
    state_dir: str,
    store: registry.RecordStore,
) -> PatchSummary:
    """The family's safety patch (both refs pinned): local copy, else the MLflow copy, else
    extracted here in one process; stored in MLflow once. (A distributed extraction, when the
    family asks for one, ran before this and left the local copy.)"""
    log = run_logger()
    out = Path(state_dir) / "patches" / key
    client, exp = store.open()
    stored = registry.find_patch_run(client, exp, key)
    if not (out / PATCH_MANIFEST).is_file() and stored is not None:
        log.info("patch %s: fetching from MLflow run %s", key, stored.info.run_id)
        with atomic_folder(out) as tmp:  # the download is tmp/patch/: its files move up
            fetched = registry.fetch_patch(client, stored.info.run_id, tmp)
            for item in fetched.iterdir():
                item.rename(tmp / item.name)
            fetched.rmdir()
    if not (out / PATCH_MANIFEST).is_file():
        log.info("patch %s: extracting from %s and %s", key, aligned, reference)
        extract(str(aligned), str(reference), out, config, progress=False)
    patch = SafetyPatch.load(out)
    if stored is None:
        run_id = registry.store_patch(client, exp, key, patch.patch_id, out)
        log.info("patch %s (id %s) stored in MLflow run %s", key, patch.patch_id, run_id)
    return PatchSummary(path=str(out), patch_id=patch.patch_id, manifest=patch.manifest)


# -- fuse, evaluate, gate ---------------------------------------------------------------------


def _fuse_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    out = Path(params["out"])
    return _key_if_exists(out / PROVENANCE, "fuse", out, params["alpha"])


@task(cache_key_fn=_fuse_cache_key, persist_result=True)
def fuse_candidate(finetuned: str, patch_dir: str, alpha: float, out: str) -> str:
    """`finetuned` + alpha * patch, written atomically to `out` (reused if complete)."""
    if (Path(out) / PROVENANCE).is_file():
        run_logger().info("fused model %s already complete; reusing it", out)
        return out
    result = fuse(finetuned, patch_dir, out, alpha=alpha, progress=False, overwrite=True)
    run_logger().info("fused %d tensors at alpha=%g into %s", result.n_fused, alpha, out)
    return out


def _reusable_report(out: Path, model: str, limit: int | None, split: str) -> bool:
    """An earlier complete evaluation of the same model, limit and split (never a failed one)."""
    try:
        report = EvalReport.load(out)
    except ValueError:  # missing, torn or foreign (a ReportError): evaluate again
        return False
    return (report.status, report.model, report.limit, report.split) == ("ok", model, limit, split)


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
) -> EvalReport:
    """Run the suite on one split ("calibration", "heldout", "all") of its data; the report,
    also written to `out`. A crash becomes a status='error' report, which the gate fails closed
    on. A complete report from an interrupted run is reused."""
    from evaluation.runner import evaluate

    log = run_logger()
    path = Path(out)
    if _reusable_report(path, model, limit, split):
        log.info("evaluation %s already complete; reusing it", path)
        return EvalReport.load(path)
    try:
        data = Path(data_dir) if data_dir else None
        report = evaluate(model, suite, path, data_dir=data, limit=limit, split=split)
    except Exception as exc:  # any evaluation failure must reach the gate, not vanish
        error = f"{type(exc).__name__}: {exc}"
        log.error("evaluation of %s failed: %s", model, error)
        known = split if split in SPLITS else "all"
        report = EvalReport(model=model, suite=suite, status="error", error=error, split=known)
    report.write(path)
    log.info(
        "evaluation of %s (%s): status=%s metrics=%s", model, split, report.status, report.metrics
    )
    return report


def drop_candidates(job: RealignJob, keep: tuple[float, int] | None) -> list[str]:
    """Delete the search's fused candidates but `keep` ((alpha, rank) of the chosen one): a 7B
    candidate is ~15 GB, and only the chosen one is registered. Returns what was deleted."""
    import shutil

    kept = None if keep is None else Path(job.fused_dir(*keep)).name
    dropped = []
    for folder in sorted(job.work.glob("fused-alpha-*")):
        if folder.is_dir() and not folder.is_symlink() and folder.name != kept:
            shutil.rmtree(folder)
            dropped.append(folder.name)
    if dropped:
        run_logger().info("deleted %d fused candidates (keep_candidates: false)", len(dropped))
    return dropped


@task
def gate_candidate(
    candidate: EvalReport,
    baseline: EvalReport,
    config: GateConfig,
    out: str,
    aligned: EvalReport | None = None,
) -> GateReport:
    """Gate one candidate report against the fine-tuned baseline (and the aligned model's, for
    rules relative to it); the report, written to `out`."""
    report = evaluate_gate(candidate, baseline, config, aligned)
    write_atomic(Path(out), report.model_dump_json(indent=2))
    run_logger().info("gate for %s: %s", candidate.model, "pass" if report.passed else "fail")
    return report


# -- the job ----------------------------------------------------------------------------------

# What MLflow's run page shows as the run's "Source": the flow that made it.
SOURCE_TAGS = {"mlflow.source.type": "JOB", "mlflow.source.name": "flows/realign.py:realign"}


class RealignJob(Frozen):
    """What every step of one realign knows: config, pinned refs, and the paths derived."""

    cfg: PipelineConfig
    fam: FamilyConfig
    family: str
    cand: Candidate
    aligned: ModelRef
    reference: ModelRef

    @cached_property
    def search(self) -> AlphaSearchConfig:
        """The family's alpha search, built once per run."""
        return self.fam.search_config()

    @cached_property
    def patches(self) -> tuple[PatchConfig, ...]:
        """The patch of every rank of the search's menu (one unless the family sets ranks)."""
        return self.fam.patch_menu()

    @cached_property
    def patch_keys(self) -> tuple[str, ...]:
        return tuple(patch_key(self.aligned, self.reference, cfg) for cfg in self.patches)

    @cached_property
    def patch_key(self) -> str:
        """The one patch's key, or the whole menu's (a digest of its patches' keys)."""
        if len(self.patch_keys) == 1:
            return self.patch_keys[0]
        return hashlib.sha256(",".join(self.patch_keys).encode()).hexdigest()[:16]

    @property
    def work(self) -> Path:
        """Per candidate and patch: a new patch never reuses fused models of an old one."""
        runs = self.cfg.resolved_state_dir() / "runs"
        return runs / slug(self.cand.key) / f"patch-{self.patch_key}"

    @property
    def run_name(self) -> str:
        return f"{self.family}-{slug(self.cand.key)}"

    @property
    def summary_key(self) -> str:
        return f"realign-{slug(self.cand.key).lower()}"[:60]

    @property
    def tags(self) -> dict[str, str]:
        """The source and the family, on the run and on its model version."""
        cand = self.cand
        src = {"source_key": cand.key, "source_repo": cand.repo, "source_revision": cand.revision}
        return src | {"family": self.family}

    @property
    def run_tags(self) -> dict[str, str]:
        return self.tags | SOURCE_TAGS

    @property
    def params(self) -> dict[str, Any]:
        """The run's inputs: pinned sources, patch settings, the alpha search's settings."""
        patch = self.fam.patch.model_dump(include={"rank_rule", "eta", "max_rank", "weight_top"})
        search = {
            f"alpha_search.{name}": ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            for name, v in self.search.model_dump(exclude_none=True, exclude={"ranks"}).items()
        }
        return {
            "source_repo": self.cand.repo,
            "source_revision": self.cand.revision,
            "aligned": self.fam.aligned,
            "aligned_revision": self.aligned.revision,
            "reference": self.fam.reference,
            "reference_revision": self.reference.revision,
            **patch,
            "suite": self.fam.suite,
        } | search

    def fused_dir(self, alpha: float, rank: int = 0) -> str:
        return str(self.work / f"fused-{candidate_name(alpha, rank)}")

    def baseline_path(self, split: str) -> str:
        return str(self.work.parent / f"eval-baseline-{split}.json")  # the fine-tune: any patch

    def eval_path(self, split: str, alpha: float, rank: int = 0) -> str:
        return str(self.work / f"eval-{split}-{candidate_name(alpha, rank)}.json")

    def gate_path(self, split: str, alpha: float, rank: int = 0) -> str:
        return str(self.work / f"gate-{split}-{candidate_name(alpha, rank)}.json")

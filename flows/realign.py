"""`realign(finetuned, family)`: patch, fuse, evaluate, gate and register one fine-tune.

Only puts tasks in order; every step is a task in `tasks/`. Safe to kill and start again: a
finished record is returned as is, completed outputs are reused, and registration is keyed by
repo@revision so a restart never makes a second version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from tasks import realign_tasks as rt
from tasks import record_tasks as rec
from tasks.config import FamilyConfig, PipelineConfig, load_config
from tasks.registry import CANDIDATE_ALIAS, CHAMPION_ALIAS
from tasks.report import Trial, before_after_table, best_effort, choose, summary_markdown
from tasks.sources import Candidate
from tasks.watch_tasks import use_hf_token

DEFAULT_CONFIG = "configs/organism.yaml"


@flow(name="realign", flow_run_name="realign-{family}")
def realign(
    finetuned: str,
    family: str = "organism",
    config: str = DEFAULT_CONFIG,
    revision: str | None = None,
) -> dict[str, Any]:
    """Re-align `finetuned` (folder or Hub id, at `revision` if given) for `family` of `config`."""
    cfg = load_config(config)
    fam = cfg.family(family)
    use_hf_token(cfg.hf_token_secret)
    ids = _ids(cfg)
    local = Path(finetuned).expanduser().is_dir()
    rev = rt.resolve_revision(finetuned) if local or not revision else revision
    if revision and rev != revision:  # a local folder edited since the watcher saw it
        raise ValueError(f"{finetuned} is at revision {rev}, not {revision} as announced")
    cand = _candidate(finetuned, rev)
    done = rec.lookup_outcome(*ids, cand.key, fam.registered_model)
    if done is not None:
        get_run_logger().info("%s was already processed (run %s)", cand.key, done["run_id"])
        return done
    aligned_rev, reference_rev = (
        rt.resolve_revision(fam.aligned),
        rt.resolve_revision(fam.reference),
    )
    params = _params(cand, fam, aligned_rev, reference_rev)
    tags = {"source_key": cand.key, "source_repo": cand.repo, "source_revision": cand.revision}
    run_id = rec.open_record(
        *ids, f"{family}-{rt.slug(cand.key)}", {**tags, "family": family}, params
    )
    key = rt.patch_key(aligned_rev, reference_rev, fam.patch)
    job = _Job(cfg, fam, family, cand, run_id, tags, key)
    try:
        return _realign_body(job)
    except BaseException as exc:
        rec.close_record(
            cfg.resolved_tracking_uri(), run_id, "error", f"{type(exc).__name__}: {exc}"
        )
        raise


def _ids(cfg: PipelineConfig) -> tuple[str, str, str]:
    return cfg.resolved_tracking_uri(), cfg.experiment, str(cfg.artifact_root())


def _candidate(finetuned: str, revision: str) -> Candidate:
    local = Path(finetuned).expanduser()
    if local.is_dir():
        return Candidate(repo=str(local.resolve()), revision=revision, lineage="local")
    return Candidate(repo=finetuned.split("@", 1)[0], revision=revision)


def _params(cand: Candidate, fam: FamilyConfig, a_rev: str, r_rev: str) -> dict[str, Any]:
    patch = fam.patch
    return {
        "source_repo": cand.repo,
        "source_revision": cand.revision,
        "aligned": fam.aligned,
        "aligned_revision": a_rev,
        "reference": fam.reference,
        "reference_revision": r_rev,
        "rank_rule": patch.rank_rule,
        "eta": patch.eta,
        "max_rank": patch.max_rank,
        "weight_top": patch.weight_top,
        "alphas": ",".join(f"{a:g}" for a in fam.alphas),
        "suite": fam.suite,
    }


@dataclass(frozen=True)
class _Job:
    """What every step of one realign needs to know (ids and paths only)."""

    cfg: PipelineConfig
    fam: FamilyConfig
    family: str
    cand: Candidate
    run_id: str
    tags: dict[str, str]
    patch_key: str

    @property
    def work(self) -> Path:
        """Per candidate and patch: a new patch never reuses fused models of an old one."""
        runs = self.cfg.resolved_state_dir() / "runs"
        return runs / rt.slug(self.cand.key) / f"patch-{self.patch_key}"


def _realign_body(job: _Job) -> dict[str, Any]:
    fam, cfg = job.fam, job.cfg
    uri, experiment, artifact_root = _ids(cfg)
    state = str(cfg.resolved_state_dir())
    patch_dir = rt.get_or_build_patch(
        fam.aligned, fam.reference, fam.patch, job.patch_key, state, uri, experiment, artifact_root
    )
    ft_dir = rt.materialize(job.cand.spec, job.cand.revision)
    evals = _evaluate_all(fam, ft_dir, patch_dir, job.work)
    trials = _gate_all(fam, evals, job.work)
    chosen = choose(trials, fam.utility_metrics)
    table = before_after_table(named(rec.metrics_of(evals["baseline"])), trials)
    reason = _reason(chosen, trials)
    get_run_logger().info("gate verdict for %s: %s", job.cand.key, reason)
    patch_id = _patch_id(patch_dir)
    _log_evidence(job, evals, trials, chosen, patch_dir, patch_id, table)
    version = _register(job, chosen, patch_id) if chosen is not None else None
    rec.close_record(uri, job.run_id, "passed" if chosen else "rejected", reason)
    verdict = "pass" if chosen else "fail"
    summary = summary_markdown(job.cand.key, table, verdict, reason, version)
    rec.publish_summary(summary, key=f"realign-{rt.slug(job.cand.key).lower()}"[:60])
    return rec.lookup_outcome(uri, experiment, artifact_root, job.cand.key, fam.registered_model)


def named(metrics: dict[str, float]) -> dict[str, float]:
    """The suite's named metrics, without lm-eval's raw `task/metric,filter` entries."""
    return {k: v for k, v in metrics.items() if "/" not in k and "," not in k}


def _log_evidence(
    job: _Job,
    evals: dict[str, str],
    trials: list[Trial],
    chosen: Trial | None,
    patch_dir: str,
    patch_id: str,
    table: str,
) -> None:
    shown = chosen or best_effort(trials, job.fam.utility_metrics)
    metrics = {f"before.{k}": v for k, v in rec.metrics_of(evals["baseline"]).items()}
    if shown is not None:
        after = rec.metrics_of(evals[f"alpha_{shown.alpha:g}"])
        metrics |= {f"after.{k}": v for k, v in after.items()}
    for t in trials:
        metrics |= {f"alpha_{t.alpha:g}.{k}": v for k, v in t.metrics.items()}
    params = {"alpha": f"{chosen.alpha:g}" if chosen else "none", "patch_id": patch_id}
    tags = {"gate_verdict": "pass" if chosen else "fail", "patch_id": patch_id}
    rec.log_evidence(
        job.cfg.resolved_tracking_uri(),
        job.run_id,
        params | _rank_params(patch_dir),
        metrics,
        tags | {"summary_table": table},
        _artifacts(evals, job.work, patch_dir, chosen),
    )


def _register(job: _Job, chosen: Trial, patch_id: str) -> str:
    aliases = [CANDIDATE_ALIAS] + ([CHAMPION_ALIAS] if job.fam.promote_to_champion else [])
    tags = job.tags | {"gate_verdict": "pass", "patch_id": patch_id, "family": job.family}
    tags["alpha"] = f"{chosen.alpha:g}"
    model_dir = str(job.work / _fused_name(chosen.alpha))
    uri = job.cfg.resolved_tracking_uri()
    return rec.register_model(uri, job.run_id, job.fam.registered_model, model_dir, tags, aliases)


def _fused_name(alpha: float) -> str:
    return f"fused-alpha-{alpha:g}"


def _evaluate_all(fam: FamilyConfig, ft_dir: str, patch_dir: str, work: Path) -> dict[str, str]:
    """Baseline (the fine-tune as is) and one report per alpha: label -> report path."""
    data = str(fam.eval_data_dir.resolve()) if fam.eval_data_dir else None
    base_out = str(work.parent / "eval-baseline.json")  # the fine-tune alone: any patch
    reports = {"baseline": rt.evaluate_model(ft_dir, fam.suite, base_out, data, fam.eval_limit)}
    for alpha in fam.alphas:
        fused = rt.fuse_candidate(ft_dir, patch_dir, alpha, str(work / _fused_name(alpha)))
        out = str(work / f"eval-alpha-{alpha:g}.json")
        reports[f"alpha_{alpha:g}"] = rt.evaluate_model(fused, fam.suite, out, data, fam.eval_limit)
    return reports


def _gate_all(fam: FamilyConfig, evals: dict[str, str], work: Path) -> list[Trial]:
    import json

    trials = []
    gate_config = fam.gate_config()
    for alpha in fam.alphas:
        label = f"alpha_{alpha:g}"
        out = str(work / f"gate-alpha-{alpha:g}.json")
        gate_path = rt.gate_candidate(evals[label], evals["baseline"], gate_config, out)
        gate = json.loads(Path(gate_path).read_text())
        failed = tuple(
            f"{r['rule']}: {r['reason']}" for r in gate["rows"] if r["verdict"] == "fail"
        )
        metrics = named(rec.metrics_of(evals[label]))
        trials.append(Trial(alpha, metrics, bool(gate["passed"]), failed))
    return trials


def _reason(chosen: Trial | None, trials: list[Trial]) -> str:
    if chosen is not None:
        return f"alpha={chosen.alpha:g} passes every rule with the best utility."
    parts = [f"alpha={t.alpha:g}: {'; '.join(t.reasons) or 'failed'}" for t in trials]
    return "No candidate passed the gate. " + " | ".join(parts)


def _patch_id(patch_dir: str) -> str:
    from lssf import SafetyPatch

    return SafetyPatch.load(patch_dir).patch_id


def _rank_params(patch_dir: str) -> dict[str, Any]:
    from lssf import SafetyPatch
    from lssf.report import summary

    return {f"ranks_{k}": v for k, v in summary(SafetyPatch.load(patch_dir).manifest).items()}


def _artifacts(
    evals: dict[str, str], work: Path, patch_dir: str, chosen: Trial | None
) -> list[tuple[str, str]]:
    """(artifact folder, local file) pairs: reports, per-sample outputs, gates, patch, plot."""
    from lssf import SafetyPatch
    from lssf.patch import MANIFEST
    from lssf.report import plot_ranks

    plot = plot_ranks(SafetyPatch.load(patch_dir).manifest, work / "patch_ranks.png")
    files = [("evaluation", path) for path in evals.values()]
    files += [("evaluation", s) for p in evals.values() if (s := rec.samples_of(p))]
    files += [("gate", str(p)) for p in sorted(work.glob("gate-alpha-*.json"))]
    files += [("patch", str(Path(patch_dir) / MANIFEST)), ("plots", str(plot))]
    if chosen is not None:
        files.append(("model_card", str(work / _fused_name(chosen.alpha) / "README.md")))
    return files

"""`realign(finetuned, family)`: patch, choose alpha, confirm, gate and register one fine-tune.

Only puts tasks in order; every step is a task in `tasks/` or a pure helper. The fine-tune is
evaluated on the calibration and the held-out split; the alpha search
(`evaluation.alpha_search`) proposes alphas, each fused, evaluated on calibration and gated by
the calibration gate (the family's gate with a safety margin); the chosen alpha is evaluated
once on held-out and gated against the held-out baseline, and only that verdict decides
registration. Safe to kill and start again: a finished record is returned as is, completed
outputs are reused (the search replays them and proposes the same alphas), and registration is
keyed by repo@revision so a restart never makes a second version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from evaluation.alpha_search import AlphaSearch, AlphaSearchConfig, calibration_gate
from evaluation.gates import GateConfig
from tasks import realign_tasks as rt
from tasks import record_tasks as rec
from tasks.config import FamilyConfig, PipelineConfig, load_config
from tasks.registry import CANDIDATE_ALIAS, CHAMPION_ALIAS
from tasks.report import HeldoutResult, SearchRecord, named, summary_markdown, summary_table
from tasks.sources import Candidate
from tasks.watch_tasks import use_hf_token

DEFAULT_CONFIG = "configs/organism.yaml"
_SPLITS = ("calibration", "heldout")


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
    done = rec.lookup_outcome(*ids, cand.key, fam.registered_model, family)
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
        "suite": fam.suite,
    } | _search_params(fam.search_config())


def _search_params(search: AlphaSearchConfig) -> dict[str, Any]:
    """The search's settings as `alpha_search.*` params (lists as comma-separated text)."""
    params: dict[str, Any] = {}
    for name, value in search.model_dump(exclude_none=True).items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        params[f"alpha_search.{name}"] = value
    return params


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
    search_cfg = fam.search_config()  # a margin that makes the gate impossible fails here, early
    cal_gate = calibration_gate(fam.gate_config(), search_cfg.margin, search_cfg.safety_metrics)
    patch_dir = rt.get_or_build_patch(
        fam.aligned, fam.reference, fam.patch, job.patch_key, state, uri, experiment, artifact_root
    )
    ft_dir = rt.materialize(job.cand.spec, job.cand.revision)
    base = {s: _evaluate(job, ft_dir, _baseline_path(job, s), s) for s in _SPLITS}
    search = _search(job, ft_dir, patch_dir, base["calibration"], cal_gate)
    heldout = _confirm(job, ft_dir, patch_dir, search.chosen(), base["heldout"])
    record = _record(job, search, cal_gate, base, heldout)
    reason = _reason(record)
    get_run_logger().info("held-out verdict for %s: %s", job.cand.key, reason)
    patch_id = _patch_id(patch_dir)
    table = summary_table(record)
    _log_evidence(job, base, record, patch_dir, patch_id, table)
    passed = heldout is not None and heldout.passed
    version = _register(job, heldout.alpha, patch_id) if heldout and passed else None
    rec.close_record(uri, job.run_id, "passed" if passed else "rejected", reason)
    summary = summary_markdown(job.cand.key, table, "pass" if passed else "fail", reason, version)
    rec.publish_summary(summary, key=f"realign-{rt.slug(job.cand.key).lower()}"[:60])
    return rec.lookup_outcome(
        uri, experiment, artifact_root, job.cand.key, fam.registered_model, job.family
    )


def _fused_name(alpha: float) -> str:
    return f"fused-alpha-{alpha:g}"


def _baseline_path(job: _Job, split: str) -> str:
    return str(job.work.parent / f"eval-baseline-{split}.json")  # the fine-tune alone: any patch


def _eval_path(job: _Job, split: str, alpha: float) -> str:
    return str(job.work / f"eval-{split}-alpha-{alpha:g}.json")


def _gate_path(job: _Job, split: str, alpha: float) -> str:
    return str(job.work / f"gate-{split}-alpha-{alpha:g}.json")


def _evaluate(job: _Job, model: str, out: str, split: str) -> str:
    fam = job.fam
    data = str(fam.eval_data_dir.resolve()) if fam.eval_data_dir else None
    return rt.evaluate_model(model, fam.suite, out, data, fam.eval_limit, split=split)


def _search(job: _Job, ft_dir: str, patch_dir: str, baseline: str, gate: GateConfig) -> AlphaSearch:
    """Propose, fuse, evaluate on calibration, gate, observe: until the search is done."""
    search = AlphaSearch(job.fam.search_config(), job.fam.utility_metrics)
    while (alpha := search.propose()) is not None:
        fused = rt.fuse_candidate(ft_dir, patch_dir, alpha, str(job.work / _fused_name(alpha)))
        report = _evaluate(job, fused, _eval_path(job, "calibration", alpha), "calibration")
        out = _gate_path(job, "calibration", alpha)
        gate_path = rt.gate_candidate(report, baseline, gate, out)
        metrics = named(rec.metrics_of(report))
        probe = search.observe_gate(alpha, metrics, rec.gate_report_of(gate_path))
        get_run_logger().info(
            "calibration probe %d: alpha=%g %s", probe.index + 1, alpha, probe.outcome
        )
    return search


def _confirm(
    job: _Job, ft_dir: str, patch_dir: str, alpha: float | None, baseline: str
) -> HeldoutResult | None:
    """The chosen alpha, evaluated once on held-out and gated against the held-out baseline."""
    if alpha is None:
        return None
    fused = rt.fuse_candidate(ft_dir, patch_dir, alpha, str(job.work / _fused_name(alpha)))
    report = _evaluate(job, fused, _eval_path(job, "heldout", alpha), "heldout")
    out = _gate_path(job, "heldout", alpha)
    gate = rec.gate_report_of(rt.gate_candidate(report, baseline, job.fam.gate_config(), out))
    reasons = tuple(f"{r.rule}: {r.reason}" for r in gate.failures)
    return HeldoutResult(
        alpha=alpha, metrics=named(rec.metrics_of(report)), passed=gate.passed, reasons=reasons
    )


def _record(
    job: _Job,
    search: AlphaSearch,
    gate: GateConfig,
    base: dict[str, str],
    heldout: HeldoutResult | None,
) -> SearchRecord:
    held = rec.report_of(base["heldout"])
    return SearchRecord(
        config=search.config,
        calibration_gate=gate.name,
        utility_metrics=job.fam.utility_metrics,
        split_rule=held.get("split_rule"),
        calibration_fraction=held.get("calibration_fraction"),
        baseline=named(rec.metrics_of(base["calibration"])),
        probes=search.trace,
        chosen=search.chosen(),
        explain=search.explain(),
        heldout_baseline=named(held.get("metrics") or {}),
        heldout=heldout,
    )


def _reason(record: SearchRecord) -> str:
    held = record.heldout
    if held is None:
        probes = [f"alpha={p.alpha:g}: {'; '.join(p.reasons) or p.outcome}" for p in record.probes]
        return f"{record.explain} " + " | ".join(probes)
    if held.passed:
        return f"{record.explain} It passes every rule on the held-out split."
    return f"{record.explain} On the held-out split it fails: " + "; ".join(held.reasons)


def _log_evidence(
    job: _Job,
    base: dict[str, str],
    record: SearchRecord,
    patch_dir: str,
    patch_id: str,
    table: str,
) -> None:
    """Held-out before/after, the calibration trace as metric series, tags and artifacts."""
    metrics, steps = _evidence_metrics(job, base, record)
    params = {
        "alpha": "none" if record.chosen is None else f"{record.chosen:g}",
        "patch_id": patch_id,
        "calibration_gate": record.calibration_gate,
        "split_rule": record.split_rule or "none",
        "calibration_fraction": record.calibration_fraction,
    }
    tags = {
        "gate_verdict": "pass" if record.verdict == "pass" else "fail",
        "heldout_verdict": record.verdict,
        "patch_id": patch_id,
        "summary_table": table,
    }
    files = rec.write_search_record(record, str(job.work / "search"))
    artifacts = _artifacts(job, base, record, patch_dir) + files
    uri, run_id = job.cfg.resolved_tracking_uri(), job.run_id
    rec.log_evidence(uri, run_id, params | _rank_params(patch_dir), metrics, tags, artifacts, steps)


def _evidence_metrics(
    job: _Job, base: dict[str, str], record: SearchRecord
) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Metrics, and the probes as series (name, value, step = probe index)."""
    metrics = {f"before.{k}": v for k, v in rec.metrics_of(base["heldout"]).items()}
    metrics |= {f"calibration.before.{k}": v for k, v in record.baseline.items()}
    steps: list[tuple[str, float, int]] = []
    for p in record.probes:
        steps += [(f"calibration.{k}", v, p.index) for k, v in p.metrics.items()]
        steps += [("calibration.alpha", p.alpha, p.index)]
        steps += [("calibration.passed", float(p.passed), p.index)]
    if record.heldout is not None:
        held = record.heldout
        after = rec.metrics_of(_eval_path(job, "heldout", held.alpha))
        metrics |= {f"after.{k}": v for k, v in after.items()}
        metrics |= {f"heldout.{k}": v for k, v in held.metrics.items()}
        metrics |= {"heldout.passed": float(held.passed), "calibration.chosen_alpha": held.alpha}
    return metrics, steps


def _register(job: _Job, alpha: float, patch_id: str) -> str:
    aliases = [CANDIDATE_ALIAS] + ([CHAMPION_ALIAS] if job.fam.promote_to_champion else [])
    tags = job.tags | {"gate_verdict": "pass", "patch_id": patch_id, "family": job.family}
    tags["alpha"] = f"{alpha:g}"
    model_dir = str(job.work / _fused_name(alpha))
    uri = job.cfg.resolved_tracking_uri()
    return rec.register_model(uri, job.run_id, job.fam.registered_model, model_dir, tags, aliases)


def _patch_id(patch_dir: str) -> str:
    from lssf import SafetyPatch

    return SafetyPatch.load(patch_dir).patch_id


def _rank_params(patch_dir: str) -> dict[str, Any]:
    from lssf import SafetyPatch
    from lssf.report import summary

    return {f"ranks_{k}": v for k, v in summary(SafetyPatch.load(patch_dir).manifest).items()}


def _artifacts(
    job: _Job, base: dict[str, str], record: SearchRecord, patch_dir: str
) -> list[tuple[str, str]]:
    """(artifact folder, local file) pairs: reports, per-sample outputs, gates, patch, plot."""
    from lssf import SafetyPatch
    from lssf.patch import MANIFEST
    from lssf.report import plot_ranks

    runs = [("calibration", p.alpha) for p in record.probes]
    if record.heldout is not None:
        runs.append(("heldout", record.heldout.alpha))
    reports = [*base.values(), *(_eval_path(job, s, a) for s, a in runs)]
    plot = plot_ranks(SafetyPatch.load(patch_dir).manifest, job.work / "patch_ranks.png")
    files = [("evaluation", path) for path in reports]
    files += [("evaluation", s) for p in reports if (s := rec.samples_of(p))]
    files += [("gate", _gate_path(job, s, a)) for s, a in runs]
    files += [("patch", str(Path(patch_dir) / MANIFEST)), ("plots", str(plot))]
    if record.chosen is not None:
        files.append(("model_card", str(job.work / _fused_name(record.chosen) / "README.md")))
    return files

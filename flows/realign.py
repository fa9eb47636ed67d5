"""`realign(finetuned, family)`: patch, choose alpha, confirm, gate and register one fine-tune.

Each alpha the search proposes is fused, evaluated on calibration and gated by the calibration
gate (the family's, with a safety margin); only the chosen alpha's held-out gate decides
registration. Safe to kill and restart: completed outputs are reused, a finished record is
returned as is, and registration is keyed by repo@revision, so never a second version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from evaluation.alpha_search import AlphaSearch, Point, calibration_gate
from evaluation.gates import GateConfig, GateReport, aligned_gate_problems
from evaluation.report import EvalReport
from lssf import PatchConfig
from lssf.errors import ConfigError
from tasks import realign_tasks as rt
from tasks import record_tasks as rec
from tasks import report
from tasks.config import load_config
from tasks.realign_tasks import PatchSummary, RealignJob
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
    store = cfg.record_store()
    cand = Candidate.of(rt.pin(finetuned, revision))
    done = rec.lookup_outcome(store, cand.key, fam.registered_model, family)
    if done is not None:
        get_run_logger().info("%s was already processed (run %s)", cand.key, done["run_id"])
        return done
    aligned, reference = rt.pin(fam.aligned), rt.pin(fam.reference)
    job = RealignJob(
        cfg=cfg, fam=fam, family=family, cand=cand, aligned=aligned, reference=reference
    )
    run_id = rec.open_record(store, job.run_name, job.run_tags, job.params)
    try:
        return _realign_body(job, run_id)
    except BaseException as exc:
        rec.close_record(store, run_id, "error", f"{type(exc).__name__}: {exc}")
        raise


def _realign_body(job: RealignJob, run_id: str) -> dict[str, Any]:
    fam, store = job.fam, job.cfg.record_store()
    search_cfg = job.search  # a margin that makes the gate impossible fails here, early
    cal_gate = calibration_gate(fam.gate_config(), search_cfg.margin, search_cfg.safety_metrics)
    aligned = _aligned_reports(job)
    patches = [_patch(job, cfg, key) for cfg, key in zip(job.patches, job.patch_keys, strict=True)]
    ft_dir = rt.materialize(job.cand.ref)
    base = {s: _evaluate(job, ft_dir, job.baseline_path(s), s) for s in ("calibration", "heldout")}
    search, heldout = _search(job, ft_dir, patches, base, cal_gate, aligned)
    record = report.search_record(search, cal_gate, fam.utility_metrics, base, heldout)
    get_run_logger().info("held-out verdict for %s: %s", job.cand.key, record.reason)
    patch = patches[record.chosen_rank or 0]
    rec.record_realign(store, run_id, job, record, patch)
    if not fam.keep_candidates:
        rt.drop_candidates(job, keep=None if heldout is None else (heldout.alpha, heldout.rank))
    passed = heldout is not None and heldout.passed
    version = None
    if passed:
        about = report.version_description(record, job.run_name, run_id)
        version = rec.register_model(
            store, run_id, job, heldout.alpha, patch.patch_id, about, rank=heldout.rank
        )
    model = fam.registered_model
    note = report.run_description(record, model, version)
    rec.close_record(store, run_id, "passed" if passed else "rejected", record.reason, note)
    summary = report.summary_markdown(job.cand.key, record, model, version)
    rec.publish_summary(summary, job.summary_key)
    return rec.lookup_outcome(store, job.cand.key, model, job.family)


def _aligned_reports(job: RealignJob) -> dict[str, EvalReport]:
    """The aligned model's reports (evaluated once per revision), and the refusal, before any
    patch or fused model, of a gate the aligned model itself fails on the held-out split: no
    repair of its fine-tunes could pass it. Calibration too when a rule is relative to it."""
    gate = job.fam.gate_config()
    relative = any(r.aligned_fraction is not None for r in gate.rules)
    folder, state = rt.materialize(job.aligned), job.cfg.resolved_state_dir() / "aligned"
    reports = {
        split: _evaluate(job, folder, str(state / f"{job.aligned.revision}-{split}.json"), split)
        for split in ("heldout", "calibration")[: 2 if relative else 1]
    }
    problems = aligned_gate_problems(gate, reports["heldout"])
    if problems:
        raise ConfigError(
            f"family {job.family}: the aligned model {job.fam.aligned} fails its own gate on "
            f"the held-out split, so no repair can pass: {'; '.join(problems)}"
        )
    return reports


def _patch(job: RealignJob, config: PatchConfig, key: str) -> PatchSummary:
    """One patch of the menu: stored, or extracted (over Dask when the family asks)."""
    state, store, fam = str(job.cfg.resolved_state_dir()), job.cfg.record_store(), job.fam
    if fam.extraction.distributed and not rt.patch_is_stored(key, state, store):
        # Over Dask into the folder get_or_build_patch reads; consolidated: the same bytes and
        # patch id as one process. The `extraction` fields are run_distributed's options.
        from flows.extract import run_distributed

        ext = fam.extraction
        get_run_logger().info("patch %s: distributed extraction (%s)", key, ext)
        aligned, reference = rt.materialize(job.aligned), rt.materialize(job.reference)
        out = Path(state) / "patches" / key
        run_distributed(aligned, reference, out, config, consolidate=True, **ext.model_dump())
    return rt.get_or_build_patch(job.aligned, job.reference, config, key, state, store)


def _evaluate(job: RealignJob, model: str, out: str, split: str) -> EvalReport:
    fam = job.fam
    data = str(fam.eval_data_dir.resolve()) if fam.eval_data_dir else None
    return rt.evaluate_model(model, fam.suite, out, data, fam.eval_limit, split=split)


def _search(
    job: RealignJob,
    ft_dir: str,
    patches: list[PatchSummary],
    base: dict[str, EvalReport],
    gate: GateConfig,
    aligned: dict[str, EvalReport],
) -> tuple[AlphaSearch, report.HeldoutResult | None]:
    """The alpha (and rank) search on calibration, then the chosen point gated once on
    held-out."""

    def probe(point: Point, split: str, rules: GateConfig) -> tuple[EvalReport, GateReport]:
        alpha, rank = point.alpha, point.rank
        out = job.fused_dir(alpha, rank)
        fused = rt.fuse_candidate(ft_dir, patches[rank].path, alpha, out)
        ev = _evaluate(job, fused, job.eval_path(split, alpha, rank), split)
        path = job.gate_path(split, alpha, rank)
        return ev, rt.gate_candidate(ev, base[split], rules, path, aligned.get(split))

    search = AlphaSearch(job.search, job.fam.utility_metrics)
    while (point := search.propose()) is not None:
        ev, verdict = probe(point, "calibration", gate)
        step = search.observe_gate(point, ev.metrics, verdict)
        get_run_logger().info(
            report.probe_line(
                step, job.search.budget, job.search.safety_metrics, job.fam.utility_metrics
            )
        )
    if (best := search.best()) is None:
        return search, None
    held = probe(best.point, "heldout", job.fam.gate_config())
    return search, report.HeldoutResult.of(best.point, *held)

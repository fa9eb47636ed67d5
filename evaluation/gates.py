"""The release gate: per metric, an absolute floor/ceiling and no regression against a baseline.

`evaluate_gate(candidate, baseline, config)` compares two `EvalReport`s (typically the
candidate = fine-tuned model after LSSF, the baseline = the fine-tuned model before it) and
fails closed: a crashed evaluation, a missing metric, a NaN or non-number, a rate outside
[0, 1], a missing or mismatched judge, reports of different splits, suites or task versions,
or too few samples fail the rule concerned, with the reason.

A delta rule (`min_delta`/`max_delta`) compares point estimates unless it is `paired`: then it
is tested on the per-prompt outcomes both reports carry (`evaluation.stats`, exact one-sided
bounds at the gate's `confidence`):
- `superiority`: the candidate must be SHOWN within the bound: the lower bound of
  `candidate - baseline` at least `min_delta` (the upper bound at most `max_delta`);
- `non-inferiority`: the rule fails only when the bound SHOWS a violation: the upper bound of
  `candidate - baseline` below `min_delta` (the lower bound above `max_delta`). Sampling noise
  alone never fails it; the burden of proof is on the loss.
`aligned_fraction` floors a metric at a fraction of the aligned model's value (an `aligned`
report is then required). The gate's rules come from a file given by the operator or a
shipped suite's gate, by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evaluation.report import EvalReport
from evaluation.stats import PairedBounds, paired_bounds

GATES_DIR = Path(__file__).resolve().parent / "configs" / "gates"


class GateConfigError(ValueError):
    """A gate config file is missing or invalid; the message names the file and fields."""


# Gating reads JSON and must stay light (no torch): `import lssf` imports torch, so lssf is
# imported only where a file is read, and the two configs spell out `lssf.models.Frozen`'s
# settings instead of inheriting them.
_FROZEN = ConfigDict(frozen=True, extra="forbid")


Paired = Literal["superiority", "non-inferiority"]


class MetricRule(BaseModel):
    """Rules on one metric. `min_delta`/`max_delta` bound `candidate - baseline`:
    `min_delta: 0.20` = at least 0.20 above the baseline; `min_delta: -0.02` = at most 0.02
    below it; `max_delta: 0.02` = at most 0.02 above it (for lower-is-better metrics).
    `paired` tests the delta bounds on per-prompt outcomes (module doc);
    `aligned_fraction: 0.9` = at least 0.9 x the aligned model's value."""

    model_config = _FROZEN

    metric: str = Field(min_length=1)
    floor: float | None = None
    ceiling: float | None = None
    min_delta: float | None = None
    max_delta: float | None = None
    paired: Paired | None = None
    aligned_fraction: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> MetricRule:
        bounds = {
            "floor": self.floor,
            "ceiling": self.ceiling,
            "min_delta": self.min_delta,
            "max_delta": self.max_delta,
            "aligned_fraction": self.aligned_fraction,
        }
        errors = [
            f"{k}={v} is not finite"
            for k, v in bounds.items()
            if v is not None and not math.isfinite(v)
        ]
        if all(v is None for v in bounds.values()):
            errors.append(
                "needs at least one of floor, ceiling, min_delta, max_delta, aligned_fraction"
            )
        if self.paired and self.min_delta is None and self.max_delta is None:
            errors.append(f"paired: {self.paired} needs min_delta or max_delta")
        if self.floor is not None and self.ceiling is not None and self.floor > self.ceiling:
            errors.append(f"floor={self.floor} > ceiling={self.ceiling}")
        if (
            self.min_delta is not None
            and self.max_delta is not None
            and self.min_delta > self.max_delta
        ):
            errors.append(f"min_delta={self.min_delta} > max_delta={self.max_delta}")
        if errors:
            raise ValueError(f"rule for {self.metric!r}: " + "; ".join(errors))
        return self


class GateConfig(BaseModel):
    """A named set of metric rules. `judge`, when set, is the judge both reports must use."""

    model_config = _FROZEN

    name: str = Field(min_length=1)
    version: int = 1
    judge: str | None = None
    require_same_suite: bool = True
    confidence: float = Field(0.95, ge=0.5, lt=1.0, description="one-sided, paired rules")
    min_samples: int = Field(1, ge=1, description="fewest samples a gated metric may rest on")
    rules: list[MetricRule] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> GateConfig:
        seen: set[str] = set()
        dupes = sorted({r.metric for r in self.rules if r.metric in seen or seen.add(r.metric)})
        if dupes:
            raise ValueError(f"metrics with more than one rule: {dupes} (merge them into one)")
        return self

    @classmethod
    def from_yaml(cls, path: Path) -> GateConfig:
        from lssf.config import load_yaml_model
        from lssf.errors import ConfigError

        try:
            return load_yaml_model(path, cls)
        except ConfigError as err:
            raise GateConfigError(str(err)) from err


def shipped_gates() -> list[str]:
    return sorted(p.stem for p in GATES_DIR.glob("*.yaml"))


def default_gate_config(suite: str) -> Path:
    """The shipped gate config for a suite (`evaluation/configs/gates/SUITE.yaml`).

    Only a shipped suite's *name* is accepted: the suite often comes from a report, which must
    not be able to choose its own gate by naming a file.
    """
    known = shipped_gates()
    if not isinstance(suite, str) or suite not in known:
        raise GateConfigError(
            f"no shipped gate config for suite {str(suite)[:80]!r} (only shipped suite names "
            f"are accepted, not paths; pass --config GATE.yaml otherwise); known: {known}"
        )
    return GATES_DIR / f"{suite}.yaml"


class GateRow(BaseModel):
    rule: str
    metric: str
    value: float | None
    threshold: float | None
    verdict: Literal["pass", "fail"]
    reason: str = ""
    # Paired rules: the statistic, its bound, the prompts and the discordant pairs behind it.
    statistic: str | None = None
    bound: float | None = None
    n: int | None = None
    gains: int | None = None
    losses: int | None = None


class GateReport(BaseModel):
    passed: bool
    config: str
    candidate: str
    baseline: str
    rows: list[GateRow]

    @property
    def failures(self) -> list[GateRow]:
        return [r for r in self.rows if r.verdict == "fail"]


# Slack for float round-off in `baseline + delta` (0.1 + 0.2 != 0.3); far below any real margin.
_EPS = 1e-9


def _value(report: EvalReport, metric: str, role: str) -> tuple[float | None, str]:
    """The metric's value, or None and why it cannot be trusted (fail closed)."""
    if report.status != "ok":
        return None, f"{role} evaluation status {report.status!r}: {report.error or 'no reason'}"
    if metric not in report.metrics:
        if metric in report.raw_metrics:  # rules name the suite's metrics, never lm-eval's
            return None, f"{role} {metric!r} is a raw lm-eval metric, not one of the suite's"
        return None, f"{role} report has no metric {metric!r}"
    value = report.metrics[metric]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"{role} {metric} is {value!r}, not a number"
    if not math.isfinite(value):
        return None, f"{role} {metric} is {value}"
    if not 0.0 <= value <= 1.0:
        return None, f"{role} {metric} is {value}, not a rate in [0, 1]"
    n = report.n_samples.get(metric)
    if n is None:
        return None, f"{role} report has no sample count for {metric}"
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return None, f"{role} {metric} comes from {n} samples"
    return float(value), ""


def _compare(
    label: str, metric: str, value: float | None, bound: float | None, op: str, why: str
) -> GateRow:
    if value is None or bound is None:
        return GateRow(
            rule=label, metric=metric, value=value, threshold=bound, verdict="fail", reason=why
        )
    ok = value >= bound - _EPS if op == ">=" else value <= bound + _EPS
    reason = "" if ok else f"{value:.4f} {'<' if op == '>=' else '>'} {bound:.4f}"
    return GateRow(
        rule=label,
        metric=metric,
        value=value,
        threshold=bound,
        verdict="pass" if ok else "fail",
        reason=reason,
    )


def _pairs(
    candidate: EvalReport, baseline: EvalReport, metric: str
) -> tuple[list[int], list[int]] | str:
    """The two reports' outcomes on the same prompts (baseline, candidate), or why not."""
    missing = [
        role
        for role, rep in (("candidate", candidate), ("baseline", baseline))
        if metric not in rep.outcomes
    ]
    if missing:
        return f"{' and '.join(missing)} report has no per-prompt outcomes for {metric}"
    cand, base = candidate.outcomes[metric].by_id(), baseline.outcomes[metric].by_id()
    if cand.keys() != base.keys():
        only = len(cand.keys() - base.keys()), len(base.keys() - cand.keys())
        return (
            f"{metric}: the reports answered different prompts ({only[0]} only in the "
            f"candidate, {only[1]} only in the baseline)"
        )
    ids = sorted(cand)
    return [base[i] for i in ids], [cand[i] for i in ids]


def _paired_row(
    label: str, rule: MetricRule, delta: float, op: str, bounds: PairedBounds
) -> GateRow:
    """`op` '>=' (a min_delta) or '<=' (a max_delta), tested as the rule's `paired` says."""
    superiority = rule.paired == "superiority"
    if op == ">=":
        bound = bounds.lower if superiority else bounds.upper
        ok = bound >= delta - _EPS if superiority else not bound < delta - _EPS
        side = "lower" if superiority else "upper"
    else:
        bound = bounds.upper if superiority else bounds.lower
        ok = bound <= delta + _EPS if superiority else not bound > delta + _EPS
        side = "upper" if superiority else "lower"
    statistic = (
        f"paired {rule.paired}: exact conditional one-sided {bounds.confidence:.0%} {side} "
        "bound on the difference (discordant pairs)"
    )
    reason = "" if ok else f"{side} bound {bound:+.4f} {'<' if op == '>=' else '>'} {delta:+g}; "
    return GateRow(
        rule=label,
        metric=rule.metric,
        value=bounds.delta,
        threshold=delta,
        verdict="pass" if ok else "fail",
        reason=(reason + bounds.describe()) if not ok else bounds.describe(),
        statistic=statistic,
        bound=bound,
        n=bounds.n,
        gains=bounds.gains,
        losses=bounds.losses,
    )


def _delta_row(
    rule: MetricRule, delta: float, op: str, candidate: EvalReport, baseline: EvalReport, conf
) -> GateRow:
    m = rule.metric
    value, why = _value(candidate, m, "candidate")
    base, base_why = _value(baseline, m, "baseline")
    label = f"{m} {op} baseline {delta:+g}" + (f" ({rule.paired})" if rule.paired else "")
    if value is None or base is None or not rule.paired:
        threshold = None if base is None else base + delta
        return _compare(label, m, value, threshold, op, why or base_why)
    pairs = _pairs(candidate, baseline, m)
    if isinstance(pairs, str):
        return _compare(label, m, None, None, op, pairs)
    return _paired_row(label, rule, delta, op, paired_bounds(*pairs, confidence=conf))


def _rule_rows(
    rule: MetricRule,
    candidate: EvalReport,
    baseline: EvalReport,
    config: GateConfig,
    aligned: EvalReport | None,
) -> list[GateRow]:
    m = rule.metric
    value, why = _value(candidate, m, "candidate")
    if value is not None and candidate.n_samples[m] < config.min_samples:
        value, why = None, f"candidate {m} rests on {candidate.n_samples[m]} samples, fewer "
        why += f"than the gate's min_samples={config.min_samples}"
    rows = []
    for bound, op in ((rule.floor, ">="), (rule.ceiling, "<=")):
        if bound is not None:
            rows.append(_compare(f"{m} {op} {bound:g}", m, value, bound, op, why))
    if rule.aligned_fraction is not None:
        rows.append(_aligned_row(rule, value, why, aligned))
    for delta, op in ((rule.min_delta, ">="), (rule.max_delta, "<=")):
        if delta is not None:
            row = _delta_row(rule, delta, op, candidate, baseline, config.confidence)
            rows.append(row if value is not None else row.model_copy(update={"verdict": "fail"}))
    return rows


def _aligned_row(
    rule: MetricRule, value: float | None, why: str, aligned: EvalReport | None
) -> GateRow:
    label = f"{rule.metric} >= {rule.aligned_fraction:g} x aligned"
    if aligned is None:
        return _compare(label, rule.metric, value, None, ">=", "no report of the aligned model")
    ref, ref_why = _value(aligned, rule.metric, "aligned")
    threshold = None if ref is None else rule.aligned_fraction * ref
    return _compare(label, rule.metric, value, threshold, ">=", why or ref_why)


def _check_row(rule: str, problem: str) -> GateRow:
    return GateRow(
        rule=rule,
        metric="-",
        value=None,
        threshold=None,
        verdict="fail" if problem else "pass",
        reason=problem,
    )


def _report_rows(candidate: EvalReport, baseline: EvalReport, config: GateConfig) -> list[GateRow]:
    """Whole-report checks: both evaluations ran, judged by the same (required) judge, on the
    same split, suite and task versions, the candidate on at least the baseline's samples."""
    rows = []
    for role, rep in (("candidate", candidate), ("baseline", baseline)):
        problem = "" if rep.status == "ok" else f"status {rep.status!r}: {rep.error or 'no reason'}"
        rows.append(_check_row(f"{role} evaluation ok", problem))
    rows.append(
        _check_row("judge present and consistent", _judge_problem(candidate, baseline, config))
    )
    same = candidate.split == baseline.split
    why = (
        "" if same else f"splits differ: candidate {candidate.split!r}, baseline {baseline.split!r}"
    )
    rows.append(_check_row("same split", why))
    if config.require_same_suite:
        same = candidate.suite == baseline.suite
        why = "" if same else f"suites differ: {candidate.suite!r} vs {baseline.suite!r}"
        rows.append(_check_row("same suite", why))
    why = ""
    if candidate.task_versions != baseline.task_versions:
        why = f"task versions differ: {candidate.task_versions} vs {baseline.task_versions}"
    rows.append(_check_row("same task versions", why[:300]))
    fewer = sorted(
        f"{m} {n} < {baseline.n_samples[m]}"
        for m, n in candidate.n_samples.items()
        if m in baseline.n_samples and n < baseline.n_samples[m]
    )
    why = "" if not fewer else "candidate has fewer samples than the baseline: " + ", ".join(fewer)
    rows.append(_check_row("samples at least the baseline's", why[:300]))
    return rows


def _judge_problem(candidate: EvalReport, baseline: EvalReport, config: GateConfig) -> str:
    judges = {"candidate": candidate.judge, "baseline": baseline.judge}
    problem = "; ".join(f"{role} report names no judge" for role, j in judges.items() if not j)
    if not problem and candidate.judge != baseline.judge:
        problem = f"judges differ: candidate {candidate.judge!r}, baseline {baseline.judge!r}"
    if not problem and candidate.metric_judges != baseline.metric_judges:
        problem = f"metric judges differ: {candidate.metric_judges} vs {baseline.metric_judges}"[
            :300
        ]
    if not problem and config.judge and candidate.judge != config.judge:
        problem = f"gate requires judge {config.judge!r}, reports used {candidate.judge!r}"
    return problem


def evaluate_gate(
    candidate: EvalReport,
    baseline: EvalReport,
    config: GateConfig,
    aligned: EvalReport | None = None,
) -> GateReport:
    """Apply every rule; passed only when every row passes. `aligned`: the aligned model's
    report on the same split, needed by `aligned_fraction` rules."""
    rows = _report_rows(candidate, baseline, config)
    for rule in config.rules:
        rows += _rule_rows(rule, candidate, baseline, config, aligned)
    return GateReport(
        passed=all(r.verdict == "pass" for r in rows),
        config=config.name,
        candidate=candidate.model,
        baseline=baseline.model,
        rows=rows,
    )


def aligned_gate_problems(config: GateConfig, aligned: EvalReport) -> list[str]:
    """Why the aligned model itself fails the gate's absolute rules (floors, ceilings and
    aligned fractions): a gate it fails can pass no repair of its fine-tunes. Empty if none."""
    problems = []
    for rule in config.rules:
        absolute = rule.model_copy(update={"min_delta": None, "max_delta": None, "paired": None})
        if absolute.floor is None and absolute.ceiling is None:
            continue
        for row in _rule_rows(absolute, aligned, aligned, config, aligned):
            if row.verdict == "fail":
                problems.append(f"{row.rule}: {row.reason}")
    return problems

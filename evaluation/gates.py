"""The release gate: per metric, an absolute floor/ceiling and no regression against a baseline.

`evaluate_gate(candidate, baseline, config)` compares two `EvalReport`s (typically the
candidate = fine-tuned model after LSSF, the baseline = the fine-tuned model before it) and
fails closed: a crashed evaluation, a missing metric, a NaN or non-number, a missing or
mismatched judge, or a missing or zero sample count fail the rule concerned, with the reason.
The gate's rules come from a file given by the operator or a shipped suite's gate, by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evaluation.report import EvalReport

GATES_DIR = Path(__file__).resolve().parent / "configs" / "gates"


class GateConfigError(ValueError):
    """A gate config file is missing or invalid; the message names the file and fields."""


# Gating reads JSON and must stay light (no torch): `import lssf` imports torch, so lssf is
# imported only where a file is read, and the two configs spell out `lssf.models.Frozen`'s
# settings instead of inheriting them.
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class MetricRule(BaseModel):
    """Rules on one metric. `min_delta`/`max_delta` bound `candidate - baseline`:
    `min_delta: 0.20` = at least 0.20 above the baseline; `min_delta: -0.02` = at most 0.02
    below it; `max_delta: 0.02` = at most 0.02 above it (for lower-is-better metrics)."""

    model_config = _FROZEN

    metric: str = Field(min_length=1)
    floor: float | None = None
    ceiling: float | None = None
    min_delta: float | None = None
    max_delta: float | None = None

    @model_validator(mode="after")
    def _check(self) -> MetricRule:
        bounds = {
            "floor": self.floor,
            "ceiling": self.ceiling,
            "min_delta": self.min_delta,
            "max_delta": self.max_delta,
        }
        errors = [
            f"{k}={v} is not finite"
            for k, v in bounds.items()
            if v is not None and not math.isfinite(v)
        ]
        if all(v is None for v in bounds.values()):
            errors.append("needs at least one of floor, ceiling, min_delta, max_delta")
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


def _rule_rows(rule: MetricRule, candidate: EvalReport, baseline: EvalReport) -> list[GateRow]:
    m = rule.metric
    value, why = _value(candidate, m, "candidate")
    rows = []
    for bound, op in ((rule.floor, ">="), (rule.ceiling, "<=")):
        if bound is not None:
            rows.append(_compare(f"{m} {op} {bound:g}", m, value, bound, op, why))
    for delta, op in ((rule.min_delta, ">="), (rule.max_delta, "<=")):
        if delta is None:
            continue
        base, base_why = _value(baseline, m, "baseline")
        threshold = None if base is None else base + delta
        rows.append(
            _compare(f"{m} {op} baseline {delta:+g}", m, value, threshold, op, why or base_why)
        )
    return rows


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
    """Whole-report checks: both evaluations ran, judged by the same (required) judge."""
    rows = []
    for role, rep in (("candidate", candidate), ("baseline", baseline)):
        problem = "" if rep.status == "ok" else f"status {rep.status!r}: {rep.error or 'no reason'}"
        rows.append(_check_row(f"{role} evaluation ok", problem))
    judges = {"candidate": candidate.judge, "baseline": baseline.judge}
    problem = "; ".join(f"{role} report names no judge" for role, j in judges.items() if not j)
    if not problem and candidate.judge != baseline.judge:
        problem = f"judges differ: candidate {candidate.judge!r}, baseline {baseline.judge!r}"
    if not problem and config.judge and candidate.judge != config.judge:
        problem = f"gate requires judge {config.judge!r}, reports used {candidate.judge!r}"
    rows.append(_check_row("judge present and consistent", problem))
    if config.require_same_suite:
        same = candidate.suite == baseline.suite
        why = "" if same else f"suites differ: {candidate.suite!r} vs {baseline.suite!r}"
        rows.append(_check_row("same suite", why))
    return rows


def evaluate_gate(candidate: EvalReport, baseline: EvalReport, config: GateConfig) -> GateReport:
    """Apply every rule; passed only when every row passes."""
    rows = _report_rows(candidate, baseline, config)
    for rule in config.rules:
        rows += _rule_rows(rule, candidate, baseline)
    return GateReport(
        passed=all(r.verdict == "pass" for r in rows),
        config=config.name,
        candidate=candidate.model,
        baseline=baseline.model,
        rows=rows,
    )

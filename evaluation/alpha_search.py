"""Choosing the fusion strength alpha on calibration data: bisection or a fixed grid.

Pure (no I/O, no Prefect, no MLflow): the realign flow and the results scripts drive it.

    search = AlphaSearch(AlphaSearchConfig(), utility_metrics=("task_accuracy",))
    while (alpha := search.propose()) is not None:
        metrics, gate = ...  # fuse at alpha, evaluate on the calibration split, gate
        search.observe_gate(alpha, metrics, gate)  # or observe(alpha, metrics, passed)
    search.chosen()  # the alpha to confirm once on the held-out split, or None

Model (why bisection finds the best trade-off): harmful refusal rises with alpha, utility and
over-refusal get worse with it, so the alphas that pass the calibration gate form one interval
`[a_safe, a_useful]` (possibly empty) and its left end, the smallest passing alpha, changes the
fine-tune least. Every probe is classified by which rules failed:

- `pass`: every rule holds;
- `too_weak`: only rules on `safety_metrics` failed (more alpha would help);
- `too_strong`: only other rules failed (utility, over-refusal: less alpha would help);
- `both`: both kinds failed: no alpha passes under the model above, the search stops;
- `error`: a whole-report check failed (crashed evaluation, judge mismatch): the search stops.

A failed probe observed without the failing metrics counts as `too_weak` (plain bisection on
pass/fail). The first probe is `alpha_max`: if it is too weak, nothing smaller can pass and the
search stops; if it is too strong (utility fails there), bisection continues downward, because
the passing interval may lie below it. Then each probe halves the bracket `(lo, hi)`, where `lo`
is the largest too-weak alpha (`alpha_min` before any) and `hi` the smallest passing or
too-strong one, until the budget is spent or `hi - lo <= tolerance`. Whatever the responses
(monotone or not), the chosen alpha is one that was observed to pass, and the number of probes
never exceeds `budget`.

Grid mode evaluates every alpha of `grid` (the pipeline's former behaviour) and chooses the
passing one with the best mean utility, ties going to the smaller alpha.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evaluation.gates import GateConfig, GateReport

Outcome = Literal["pass", "too_weak", "too_strong", "both", "error"]
# What a whole-report gate row (status, judge, suite checks) names as its metric.
REPORT_CHECK = "-"
# Proposals are rounded to this many significant digits, so `f"{alpha:g}"` names them exactly.
_DIGITS = 6
_STOP_WHY = {
    "both": "safety and utility rules fail together, so no alpha can pass",
    "error": "an evaluation failed or a report check did not hold",
}


class AlphaSearchConfig(BaseModel):
    """How alpha is chosen on the calibration split (`alpha_search:` of a family)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    mode: Literal["bisect", "grid"] = Field(
        "bisect",
        description="'bisect': the smallest passing alpha in (alpha_min, alpha_max]; "
        "'grid': every alpha of `grid`, the passing one with the best utility wins",
    )
    alpha_min: float = Field(
        0.0, ge=0.0, description="lower end of the bracket, taken as too weak and never probed"
    )
    alpha_max: float = Field(2.0, gt=0.0, description="strongest alpha tried; probed first")
    budget: int = Field(
        6, ge=2, description="most calibration evaluations (fuse + evaluate + gate) per search"
    )
    margin: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="tightening of every rule on a safety metric for the calibration gate "
        "(floors and min_delta raised, ceilings and max_delta lowered by this much)",
    )
    tolerance: float = Field(
        0.05, gt=0.0, description="bisection stops once the bracket is this narrow"
    )
    safety_metrics: tuple[str, ...] = Field(
        ("harmful_refusal",),
        min_length=1,
        description="metrics that rise with alpha: the margin applies to their rules, and a "
        "probe failing only on them is too weak (any other failing rule: too strong)",
    )
    grid: tuple[float, ...] | None = Field(
        None, description="alphas to evaluate in mode 'grid' (at least one; each > 0, distinct)"
    )

    @model_validator(mode="after")
    def _check(self) -> AlphaSearchConfig:
        errors = []
        if self.alpha_min >= self.alpha_max:
            errors.append(f"alpha_min={self.alpha_min} must be < alpha_max={self.alpha_max}")
        if self.mode == "grid":
            errors += _grid_errors(self.grid, self.budget)
        elif self.grid is not None:
            errors.append("grid is only used with mode 'grid'")
        if errors:
            raise ValueError("; ".join(errors))
        return self


def _grid_errors(grid: tuple[float, ...] | None, budget: int) -> list[str]:
    if not grid:
        return ["mode 'grid' needs a grid (the alphas to evaluate)"]
    errors = []
    bad = [a for a in grid if not a > 0]
    if bad:
        errors.append(f"grid alphas must be > 0, got {bad}")
    if len(set(grid)) != len(grid):
        errors.append(f"grid alphas must be distinct, got {list(grid)}")
    if len(grid) > budget:
        errors.append(f"grid has {len(grid)} alphas but budget={budget}; raise the budget")
    return errors


class Probe(BaseModel):
    """One calibration evaluation of the search: alpha, metrics, and what the gate said."""

    model_config = ConfigDict(frozen=True)

    index: int
    alpha: float
    metrics: dict[str, float]
    passed: bool
    outcome: Outcome
    failed: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()


def utility(metrics: Mapping[str, float], names: Sequence[str]) -> float:
    """Mean of the utility metrics (0 when none is named); a missing or NaN one is worst."""
    if not names:
        return 0.0
    values = [metrics.get(n, math.nan) for n in names]
    if any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
        return -math.inf
    return sum(values) / len(values)


def classify(passed: bool, failed: Iterable[str], safety_metrics: Sequence[str]) -> Outcome:
    """A probe's outcome from the metrics of its failing gate rules (see the module doc)."""
    failing = set(failed)
    if passed:
        return "pass"
    if REPORT_CHECK in failing:
        return "error"
    weak = failing & set(safety_metrics)
    if weak and failing - weak:
        return "both"
    return "too_strong" if failing and not weak else "too_weak"


def failed_metrics(report: GateReport) -> tuple[str, ...]:
    """The metrics of a gate report's failing rows (`-` for a whole-report check)."""
    return tuple(sorted({r.metric for r in report.failures}))


def calibration_gate(
    gate: GateConfig, margin: float, safety_metrics: Sequence[str] = ("harmful_refusal",)
) -> GateConfig:
    """The stricter gate the search uses: every bound on a safety metric tightened by
    `margin` (floor/min_delta raised, ceiling/max_delta lowered); other rules unchanged.
    Raises ValueError when the margin makes a rule impossible (floor above ceiling)."""
    signs = {"floor": 1.0, "min_delta": 1.0, "ceiling": -1.0, "max_delta": -1.0}
    rules = []
    for rule in gate.rules:
        data = rule.model_dump()
        if rule.metric in safety_metrics:
            for key, sign in signs.items():
                if data[key] is not None:
                    data[key] += sign * margin
        rules.append(data)
    data = gate.model_dump() | {"name": f"{gate.name}-calibration", "rules": rules}
    try:
        return GateConfig.model_validate(data)
    except ValidationError as err:
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ValueError(f"calibration gate with margin {margin:g}: {why}") from None


class AlphaSearch:
    """The search's state: `propose` the next alpha, `observe` its calibration result."""

    def __init__(self, config: AlphaSearchConfig, utility_metrics: Sequence[str] = ()) -> None:
        self.config = config
        self.utility_metrics = tuple(utility_metrics)
        self.trace: list[Probe] = []
        self._pending: float | None = None

    def propose(self) -> float | None:
        """The next alpha to evaluate on calibration, or None when the search is over.
        Asking again before `observe` returns the same alpha."""
        if self._pending is None:
            self._pending = self._next()
        return self._pending

    def observe(
        self,
        alpha: float,
        metrics: Mapping[str, float],
        passed: bool,
        *,
        failed: Iterable[str] = (),
        reasons: Iterable[str] = (),
    ) -> Probe:
        """Record the calibration result of the proposed `alpha`. `passed`: the metrics clear
        the calibration gate (margin applied); `failed`: the metrics of its failing rules."""
        if self._pending is None or alpha != self._pending:
            raise ValueError(f"observe({alpha}): the pending proposal is {self._pending}")
        failed = tuple(sorted(set(failed)))
        probe = Probe(
            index=len(self.trace),
            alpha=alpha,
            metrics=dict(metrics),
            passed=passed,
            outcome=classify(passed, failed, self.config.safety_metrics),
            failed=failed,
            reasons=tuple(reasons),
        )
        self.trace.append(probe)
        self._pending = None
        return probe

    def observe_gate(self, alpha: float, metrics: Mapping[str, float], gate: GateReport) -> Probe:
        """`observe` from the calibration gate's report."""
        reasons = [f"{r.rule}: {r.reason}" for r in gate.failures]
        failed = failed_metrics(gate)
        return self.observe(alpha, metrics, gate.passed, failed=failed, reasons=reasons)

    def chosen(self) -> float | None:
        """Bisect: the smallest passing alpha. Grid: the passing alpha with the best utility
        (ties: the smaller). None when no probe passed."""
        passing = [p for p in self.trace if p.passed]
        if not passing:
            return None
        if self.config.mode == "bisect":
            return min(p.alpha for p in passing)
        best = max(passing, key=lambda p: (utility(p.metrics, self.utility_metrics), -p.alpha))
        return best.alpha

    def _next(self) -> float | None:
        cfg = self.config
        if len(self.trace) >= cfg.budget:
            return None
        if cfg.mode == "grid":
            grid = cfg.grid or ()
            return grid[len(self.trace)] if len(self.trace) < len(grid) else None
        if not self.trace:
            return cfg.alpha_max
        if any(p.outcome in _STOP_WHY for p in self.trace):
            return None
        lo, hi = self.bracket()
        if hi is None or hi - lo <= cfg.tolerance:
            return None
        mid = float(f"{(lo + hi) / 2:.{_DIGITS}g}")
        return mid if lo < mid < hi else None

    def bracket(self) -> tuple[float, float | None]:
        """(largest too-weak alpha or alpha_min, smallest passing or too-strong alpha)."""
        weak = [p.alpha for p in self.trace if p.outcome == "too_weak"]
        high = [p.alpha for p in self.trace if p.outcome in ("pass", "too_strong")]
        return max([self.config.alpha_min, *weak]), min(high) if high else None

    def explain(self) -> str:
        """One sentence on how the search ended, for the run's reason and logs."""
        n, chosen = len(self.trace), self.chosen()
        mode = self.config.mode
        if chosen is not None:
            how = "smallest passing" if mode == "bisect" else "passing with the best utility"
            return f"alpha={chosen:g} is the {how} on calibration ({n} probes, {mode})."
        stops = [p for p in self.trace if p.outcome in _STOP_WHY]
        if stops and mode == "bisect":
            why = f"stopped at alpha={stops[0].alpha:g}: {_STOP_WHY[stops[0].outcome]}"
        elif mode == "bisect" and self.trace and self.trace[0].outcome == "too_weak":
            why = f"even alpha_max={self.trace[0].alpha:g} is too weak"
        else:
            why = "no probe passed"
        return f"No alpha passed the calibration gate: {why} ({n} probes, {mode})."

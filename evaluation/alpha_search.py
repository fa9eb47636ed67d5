"""Choosing the fusion strength alpha (and the rank) on calibration data.

Pure (no I/O, no Prefect, no MLflow): the realign flow and the results scripts drive it.

    search = AlphaSearch(AlphaSearchConfig(), utility_metrics=("task_accuracy",))
    while (point := search.propose()) is not None:
        metrics, gate = ...  # fuse the menu's rank point.rank at point.alpha, evaluate, gate
        search.observe_gate(point, metrics, gate)  # or observe(point, metrics, passed)
    search.best()  # the point to confirm once on the held-out split, or None

Every probe is classified by which rules failed:

- `pass`: every rule holds;
- `too_weak`: only rules on `safety_metrics` failed (more alpha would help);
- `too_strong`: only other rules failed (utility, over-refusal: less alpha would help);
- `both`: both kinds failed (often a broken model: refusal need not rise with alpha there);
- `error`: a whole-report check failed (crashed evaluation, judge mismatch): the search stops.

A failed probe observed without the failing metrics counts as `too_weak`.

`sweep` (the default) assumes nothing about monotonicity. It first probes `sweep_points`
log-spaced alphas from `alpha_max / 2^(sweep_points - 1)` to `alpha_max` for every rank of the
menu (smallest alpha first), then spends the rest of the budget bisecting one bracket at a time:
- if some probe passed: the bracket below the best passing point's lowest passing alpha (from
  the largest failing alpha under it, or `alpha_min`), since a smaller passing alpha changes
  the fine-tune less;
- else the lowest bracket of any rank whose lower end is too weak (or `alpha_min`) and whose
  upper end fails on utility (`too_strong` or `both`): a passing window may lie inside, even
  below a broken alpha. Ranks take turns (fewest refinements first, then menu order).
It stops when the budget is spent or every open bracket is narrower than `tolerance`.

`best()` is the passing point with the best mean utility; points within `utility_tie` of it
are tied (default 0: exact ties), and ties go to the smaller alpha, then to the lower rank (the
menu is listed from the lowest rank up). `bisect` is the v1 search (the
smallest passing alpha by bisection from `alpha_max`, stopping at the first `both`); `grid`
evaluates fixed alphas, chosen like sweep. Proposals are rounded to 6 significant digits
(`candidate_name` formats them exactly).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evaluation.gates import GateConfig, GateReport

Outcome = Literal["pass", "too_weak", "too_strong", "both", "error"]
# What a whole-report gate row (status, judge, suite checks) names as its metric.
REPORT_CHECK = "-"
# Proposals are rounded to this many significant digits, so `candidate_name` names them exactly.
_DIGITS = 6
_UTILITY_FAILS = ("too_strong", "both")
_EPS = 1e-9  # utilities are means of k/n rates: round-off must not break a tie
_STOP_WHY = {
    "both": "safety and utility rules fail together, so no alpha can pass",
    "error": "an evaluation failed or a report check did not hold",
}


class RankChoice(BaseModel):
    """One rank setting of a search's menu: PatchConfig fields that override the family's
    patch (`{eta: 0.5}`, `{rank_rule: full, max_rank: 4}`). Empty: the family's own patch."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rank_rule: Literal["entropy", "energy", "full"] | None = None
    eta: float | None = Field(None, gt=0.0, le=1.0)
    max_rank: int | None = Field(None, ge=1)

    def overrides(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)

    @property
    def label(self) -> str:
        fields = self.overrides()
        return ",".join(f"{k}={v}" for k, v in fields.items()) or "patch"


class AlphaSearchConfig(BaseModel):
    """How alpha (and the rank) is chosen on the calibration split (`alpha_search:`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    mode: Literal["sweep", "bisect", "grid"] = Field(
        "sweep",
        description="'sweep': log-spaced alphas up to alpha_max for every rank of the menu, "
        "then bisection inside the best bracket, the passing point with the best utility "
        "wins; 'bisect': v1, the smallest passing alpha by bisection from alpha_max; "
        "'grid': every alpha of `grid`, the passing one with the best utility wins",
    )
    alpha_min: float = Field(
        0.0, ge=0.0, description="lower end of every bracket, taken as too weak, never probed"
    )
    alpha_max: float = Field(4.0, gt=0.0, description="strongest alpha tried")
    sweep_points: int = Field(
        5, ge=2, description="sweep: alphas alpha_max / 2^k for k = sweep_points-1 .. 0"
    )
    budget: int = Field(
        8, ge=2, description="most calibration evaluations (fuse + evaluate + gate) per search"
    )
    margin: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="tightening of every rule on a safety metric for the calibration gate "
        "(floors and min_delta raised, ceilings and max_delta lowered by this much)",
    )
    tolerance: float = Field(
        0.05, gt=0.0, description="a bracket this narrow is not bisected further"
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
    utility_tie: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="sweep and grid: passing points whose mean utility is within this of the "
        "best count as tied, and ties go to the smaller alpha, then the lower rank (0: exact "
        "ties only; the gate's utility margin, e.g. 0.02, keeps calibration noise from "
        "choosing a stronger alpha)",
    )
    ranks: tuple[RankChoice, ...] = Field(
        (RankChoice(),),
        min_length=1,
        description="the rank menu searched jointly with alpha, lowest rank first (sweep and "
        "grid); default: the family's patch alone",
    )

    @model_validator(mode="after")
    def _check(self) -> AlphaSearchConfig:
        errors = []
        if self.alpha_min >= self.alpha_max:
            errors.append(f"alpha_min={self.alpha_min} must be < alpha_max={self.alpha_max}")
        if self.mode == "grid":
            errors += _grid_errors(self.grid, self.budget, len(self.ranks))
        elif self.grid is not None:
            errors.append("grid is only used with mode 'grid'")
        if self.mode == "bisect" and len(self.ranks) > 1:
            errors.append("mode 'bisect' searches one rank; use mode 'sweep' for a rank menu")
        if self.mode == "sweep" and self.budget < self.sweep_points * len(self.ranks):
            errors.append(
                f"budget={self.budget} does not cover the sweep: {self.sweep_points} alphas x "
                f"{len(self.ranks)} ranks; raise the budget or lower sweep_points"
            )
        if len(set(self.ranks)) != len(self.ranks):
            errors.append("ranks must be distinct")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def sweep_alphas(self) -> list[float]:
        """The sweep's alphas, smallest first (above alpha_min)."""
        alphas = [_round(self.alpha_max / 2**k) for k in range(self.sweep_points - 1, -1, -1)]
        return [a for a in alphas if a > self.alpha_min]


def _grid_errors(grid: tuple[float, ...] | None, budget: int, ranks: int) -> list[str]:
    if not grid:
        return ["mode 'grid' needs a grid (the alphas to evaluate)"]
    errors = []
    bad = [a for a in grid if not a > 0]
    if bad:
        errors.append(f"grid alphas must be > 0, got {bad}")
    if len(set(grid)) != len(grid):
        errors.append(f"grid alphas must be distinct, got {list(grid)}")
    if len(grid) * ranks > budget:
        errors.append(
            f"grid has {len(grid)} alphas x {ranks} ranks but budget={budget}; raise the budget"
        )
    return errors


def _round(alpha: float) -> float:
    return float(f"{alpha:.{_DIGITS}g}")


def candidate_name(alpha: float, rank: int = 0) -> str:
    """The one name of a candidate in paths and tables: `alpha-0.1875` (`-r1` for the second
    rank of a menu). Alphas are proposed at 6 significant digits, which `g` prints exactly."""
    if _round(alpha) != alpha:
        raise ValueError(f"alpha {alpha!r} has more than {_DIGITS} significant digits")
    return f"alpha-{alpha:g}" + (f"-r{rank}" if rank else "")


@dataclass(frozen=True, order=True)
class Point:
    """A candidate of the search: the menu's rank index and alpha."""

    rank: int
    alpha: float


class Probe(BaseModel):
    """One calibration evaluation of the search: alpha, rank, metrics, what the gate said."""

    model_config = ConfigDict(frozen=True)

    index: int
    alpha: float
    metrics: dict[str, float]
    passed: bool
    outcome: Outcome
    failed: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    rank: int = 0
    rank_label: str = "patch"

    @property
    def point(self) -> Point:
        return Point(self.rank, self.alpha)


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


def select(
    trace: Sequence[Probe], utility_metrics: Sequence[str], tie: float = 0.0
) -> Probe | None:
    """The passing probe with the best mean utility; those within `tie` of it are tied, and
    ties go to the smaller alpha, then the lower rank. None when nothing passed."""
    passing = [p for p in trace if p.passed]
    if not passing:
        return None
    score = {p.index: utility(p.metrics, utility_metrics) for p in passing}
    top = max(score.values())
    tied = [p for p in passing if score[p.index] >= top - tie - _EPS]
    return min(tied, key=lambda p: (p.alpha, p.rank))


class AlphaSearch:
    """The search's state: `propose` the next point, `observe` its calibration result."""

    def __init__(self, config: AlphaSearchConfig, utility_metrics: Sequence[str] = ()) -> None:
        self.config = config
        self.utility_metrics = tuple(utility_metrics)
        self.trace: list[Probe] = []
        self._pending: Point | None = None

    def propose(self) -> Point | None:
        """The next point to evaluate on calibration, or None when the search is over.
        Asking again before `observe` returns the same point."""
        if self._pending is None:
            self._pending = self._next()
        return self._pending

    def observe(
        self,
        point: Point,
        metrics: Mapping[str, float],
        passed: bool,
        *,
        failed: Iterable[str] = (),
        reasons: Iterable[str] = (),
    ) -> Probe:
        """Record the calibration result of the proposed `point`. `passed`: the metrics clear
        the calibration gate (margin applied); `failed`: the metrics of its failing rules."""
        if self._pending is None or point != self._pending:
            raise ValueError(f"observe({point}): the pending proposal is {self._pending}")
        failed = tuple(sorted(set(failed)))
        probe = Probe(
            index=len(self.trace),
            alpha=point.alpha,
            metrics=dict(metrics),
            passed=passed,
            outcome=classify(passed, failed, self.config.safety_metrics),
            failed=failed,
            reasons=tuple(reasons),
            rank=point.rank,
            rank_label=self.config.ranks[point.rank].label,
        )
        self.trace.append(probe)
        self._pending = None
        return probe

    def observe_gate(self, point: Point, metrics: Mapping[str, float], gate: GateReport) -> Probe:
        """`observe` from the calibration gate's report."""
        reasons = [f"{r.rule}: {r.reason}" for r in gate.failures]
        failed = failed_metrics(gate)
        return self.observe(point, metrics, gate.passed, failed=failed, reasons=reasons)

    def best(self) -> Probe | None:
        """Sweep and grid: the passing probe with the best utility (ties, within
        `utility_tie`: the smaller alpha, then the lower rank). Bisect: the smallest passing
        alpha. None when nothing passed."""
        if self.config.mode == "bisect":
            return min((p for p in self.trace if p.passed), key=lambda p: p.alpha, default=None)
        return select(self.trace, self.utility_metrics, self.config.utility_tie)

    def chosen(self) -> float | None:
        """The best point's alpha, or None."""
        best = self.best()
        return None if best is None else best.alpha

    def _next(self) -> Point | None:
        cfg = self.config
        if len(self.trace) >= cfg.budget:
            return None
        if cfg.mode == "grid":  # a fixed design: every point, whatever the earlier ones said
            grid = [Point(r, a) for r in range(len(cfg.ranks)) for a in cfg.grid or ()]
            return grid[len(self.trace)] if len(self.trace) < len(grid) else None
        if cfg.mode == "bisect":
            return self._next_bisect()
        if any(p.outcome == "error" for p in self.trace):
            return None
        seen = {p.point for p in self.trace}
        for rank in range(len(cfg.ranks)):
            for alpha in cfg.sweep_alphas():
                if Point(rank, alpha) not in seen:
                    return Point(rank, alpha)
        return self._refine()

    def _refine(self) -> Point | None:
        """The midpoint of the next bracket to refine (module doc), or None."""
        for rank, bracket in self._brackets():
            point = self._midpoint(rank, bracket)
            if point is not None:
                return point
        return None

    def _brackets(self) -> Iterable[tuple[int, tuple[float, float]]]:
        """Brackets in the order they are refined: below the best point's lowest pass first,
        then every rank's (fewest refinements first): below its lowest pass, else its open
        weak-to-failing brackets, lowest first."""
        best = self.best()
        ranks = range(len(self.config.ranks))
        refined = {r: sum(p.index >= self._sweep_size() for p in self._probes(r)) for r in ranks}
        order = sorted(ranks, key=lambda r: (r != (best.rank if best else -1), refined[r], r))
        for rank in order:
            passes = [p.alpha for p in self._probes(rank) if p.passed]
            if passes:
                yield rank, self._below(rank, min(passes))
            else:
                for bracket in self._open_brackets(rank):
                    yield rank, bracket

    def _sweep_size(self) -> int:
        return len(self.config.sweep_alphas()) * len(self.config.ranks)

    def _probes(self, rank: int) -> list[Probe]:
        return sorted((p for p in self.trace if p.rank == rank), key=lambda p: p.alpha)

    def _below(self, rank: int, alpha: float) -> tuple[float, float]:
        """(the largest failing alpha under `alpha`, or alpha_min; `alpha`)."""
        lower = [p.alpha for p in self._probes(rank) if p.alpha < alpha and not p.passed]
        return max([self.config.alpha_min, *lower]), alpha

    def _open_brackets(self, rank: int) -> list[tuple[float, float]]:
        """Adjacent (too weak, fails on utility) pairs of this rank, lowest first."""
        probes = self._probes(rank)
        lows = [self.config.alpha_min, *(p.alpha for p in probes)]
        kinds = ["too_weak", *(p.outcome for p in probes)]
        return [
            (lows[i], lows[i + 1])
            for i in range(len(probes))
            if kinds[i] == "too_weak" and kinds[i + 1] in _UTILITY_FAILS
        ]

    def _midpoint(self, rank: int, bracket: tuple[float, float]) -> Point | None:
        lo, hi = bracket
        mid = _round((lo + hi) / 2)
        if hi - lo <= self.config.tolerance or not lo < mid < hi:
            return None
        return Point(rank, mid)

    def _next_bisect(self) -> Point | None:
        cfg = self.config
        if not self.trace:
            return Point(0, cfg.alpha_max)
        if any(p.outcome in _STOP_WHY for p in self.trace):
            return None
        lo, hi = self.bracket()
        if hi is None:
            return None
        return self._midpoint(0, (lo, hi))

    def bracket(self) -> tuple[float, float | None]:
        """Bisect: (largest too-weak alpha or alpha_min, smallest passing or too-strong)."""
        weak = [p.alpha for p in self.trace if p.outcome == "too_weak"]
        high = [p.alpha for p in self.trace if p.outcome in ("pass", "too_strong")]
        return max([self.config.alpha_min, *weak]), min(high) if high else None

    def explain(self) -> str:
        """One sentence on how the search ended, for the run's reason and logs."""
        n, best, mode = len(self.trace), self.best(), self.config.mode
        ranks = f", rank {best.rank_label}" if best and len(self.config.ranks) > 1 else ""
        if best is not None:
            how = "smallest passing" if mode == "bisect" else "passing point with the best utility"
            return f"alpha={best.alpha:g}{ranks} is the {how} on calibration ({n} probes, {mode})."
        stops = [p for p in self.trace if p.outcome in _STOP_WHY]
        if stops and (mode == "bisect" or (mode == "sweep" and stops[0].outcome == "error")):
            why = f"stopped at alpha={stops[0].alpha:g}: {_STOP_WHY[stops[0].outcome]}"
        elif self.trace and all(p.outcome == "too_weak" for p in self.trace):
            why = f"even alpha={max(p.alpha for p in self.trace):g} is too weak"
        else:
            why = "no probe passed"
        return f"No alpha passed the calibration gate: {why} ({n} probes, {mode})."

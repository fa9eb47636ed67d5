"""The alpha search (evaluation/alpha_search.py): properties on synthetic response functions."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from evaluation.alpha_search import (
    AlphaSearch,
    AlphaSearchConfig,
    Point,
    RankChoice,
    calibration_gate,
    candidate_name,
    classify,
    failed_metrics,
)
from evaluation.gates import GateConfig, evaluate_gate
from evaluation.report import EvalReport

# A response: alpha -> (passed, failing metrics).
Response = Callable[[float], tuple[bool, tuple[str, ...]]]
SAFETY, UTILITY = "harmful_refusal", "task_accuracy"


# The v1 search (bisection from alpha_max = 2, at most 6 probes): the mode's own tests.
V1 = {"mode": "bisect", "alpha_max": 2.0, "budget": 6}


def bisect(**changes: object) -> AlphaSearchConfig:
    return AlphaSearchConfig.model_validate(V1 | changes)


def run(search: AlphaSearch, respond: Response, limit: int = 100) -> AlphaSearch:
    for _ in range(limit):
        point = search.propose()
        if point is None:
            return search
        passed, failed = respond(point.alpha)
        search.observe(point, {"alpha": point.alpha}, passed, failed=failed)
    raise AssertionError(f"the search proposed more than {limit} alphas")


def threshold(t: float) -> Response:
    """Monotone: refusal clears the floor from alpha t on; utility always holds."""
    return lambda a: (a >= t, () if a >= t else (SAFETY,))


def window(safe: float, useful: float) -> Response:
    """Refusal clears the floor from `safe` on, utility holds up to `useful`."""

    def respond(a: float) -> tuple[bool, tuple[str, ...]]:
        failed = ((SAFETY,) if a < safe else ()) + ((UTILITY,) if a > useful else ())
        return not failed, failed

    return respond


def resolution(cfg: AlphaSearchConfig) -> float:
    """How close to the boundary bisection gets: the tolerance, or the budget's halvings."""
    return max(cfg.tolerance, (cfg.alpha_max - cfg.alpha_min) / 2 ** (cfg.budget - 1))


# -- config -----------------------------------------------------------------------------------


def test_defaults_and_frozen() -> None:
    cfg = AlphaSearchConfig()
    assert (cfg.mode, cfg.alpha_max, cfg.budget, cfg.margin) == ("sweep", 4.0, 8, 0.05)
    assert cfg.sweep_alphas() == [0.25, 0.5, 1.0, 2.0, 4.0]
    with pytest.raises(ValidationError):
        cfg.budget = 3  # type: ignore[misc]


@pytest.mark.parametrize("field", ["alpha_max", "alpha_min", "margin", "tolerance"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_values_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        AlphaSearchConfig.model_validate({field: value})
    with pytest.raises(ValidationError, match="grid"):
        AlphaSearchConfig(mode="grid", grid=(1.0, value))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"alpha_min": 2.0, "alpha_max": 1.0}, "alpha_min=2.0 must be < alpha_max=1.0"),
        ({"mode": "grid"}, "needs a grid"),
        ({"grid": [1.0]}, "only used with mode 'grid'"),
        ({"mode": "grid", "grid": [1.0, 1.0]}, "distinct"),
        ({"mode": "grid", "grid": [0.0, 1.0]}, "must be > 0"),
        ({"mode": "grid", "grid": [0.5, 1, 1.5], "budget": 2}, "budget=2"),
        ({"budget": 1}, "budget"),
        ({"margin": 1.0}, "margin"),
        ({"safety_metrics": []}, "safety_metrics"),
        ({"alpha_maxx": 1.0}, "alpha_maxx"),
    ],
)
def test_bad_configs_name_the_problem(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AlphaSearchConfig.model_validate(data)


# -- bisection properties ---------------------------------------------------------------------


@pytest.mark.parametrize("budget", [2, 3, 6, 9])
def test_monotone_finds_the_smallest_passing_alpha_within_resolution(budget: int) -> None:
    rng = random.Random(budget)
    cfg = bisect(budget=budget, tolerance=0.01)
    for _ in range(200):
        t = rng.uniform(0.001, cfg.alpha_max)
        search = run(AlphaSearch(cfg), threshold(t))
        chosen = search.chosen()
        assert len(search.trace) <= budget
        assert chosen is not None and chosen >= t  # it passes
        assert chosen - t <= resolution(cfg) + 1e-9


def test_first_probe_is_alpha_max_then_halves() -> None:
    search = run(AlphaSearch(bisect()), threshold(0.3))
    assert [p.alpha for p in search.trace] == [2.0, 1.0, 0.5, 0.25, 0.375, 0.3125]
    assert [p.outcome for p in search.trace][:4] == ["pass", "pass", "pass", "too_weak"]
    assert search.chosen() == 0.3125
    assert "alpha=0.3125 is the smallest passing on calibration (6 probes, bisect)" in (
        search.explain()
    )


def test_tolerance_stops_early() -> None:
    cfg = bisect(tolerance=0.3, budget=20)
    search = run(AlphaSearch(cfg), threshold(0.6))
    lo, hi = search.bracket()
    assert hi is not None and hi - lo <= 0.3 < 2 * (hi - lo)
    assert len(search.trace) == 4  # 2, 1, 0.5, 0.75: bracket (0.5, 0.75]


def test_too_weak_at_alpha_max_stops_at_once() -> None:
    search = run(AlphaSearch(bisect()), threshold(5.0))
    assert [p.alpha for p in search.trace] == [2.0] and search.chosen() is None
    assert "even alpha=2 is too weak" in search.explain()


def test_too_strong_at_alpha_max_continues_downward() -> None:
    """Utility fails at alpha_max while refusal holds: the passing interval lies lower."""
    cfg = bisect(budget=8, tolerance=0.01)
    search = run(AlphaSearch(cfg), window(safe=0.4, useful=0.9))
    assert search.trace[0].outcome == "too_strong"
    chosen = search.chosen()
    assert chosen is not None and 0.4 <= chosen <= 0.9
    assert chosen - 0.4 <= resolution(cfg)


@pytest.mark.parametrize("budget", [3, 6, 10])
def test_window_responses_pass_and_stay_in_budget(budget: int) -> None:
    rng = random.Random(100 + budget)
    cfg = bisect(budget=budget, tolerance=0.001)
    found = 0
    for _ in range(300):
        safe = rng.uniform(0.0, 2.5)
        useful = safe + rng.uniform(0.0, 1.5)
        search = run(AlphaSearch(cfg), window(safe, useful))
        assert len(search.trace) <= budget
        chosen = search.chosen()
        if chosen is not None:
            found += 1
            assert safe <= chosen <= useful
            assert chosen - safe <= resolution(cfg) + 1e-9
        elif safe <= cfg.alpha_max and useful - safe > 2 * resolution(cfg):
            pytest.fail(f"missed the window [{safe}, {useful}] with budget {budget}")
    assert found > 50


def test_non_monotone_responses_never_break_the_contract() -> None:
    """Noise (each probe passes or fails at random, with random failing metrics): the budget
    holds and the chosen alpha is one that was observed to pass."""
    rng = random.Random(7)
    kinds = [(), (SAFETY,), (UTILITY,), (SAFETY, UTILITY), ("-",)]
    for budget in (2, 4, 6, 12):
        cfg = bisect(budget=budget, tolerance=1e-4)
        for _ in range(300):

            def respond(a: float) -> tuple[bool, tuple[str, ...]]:
                failed = rng.choice(kinds)
                return not failed and rng.random() < 0.7, failed

            search = run(AlphaSearch(cfg), respond)
            assert len(search.trace) <= budget
            assert all(0.0 < p.alpha <= cfg.alpha_max for p in search.trace)
            passing = {p.alpha for p in search.trace if p.passed}
            chosen = search.chosen()
            assert (chosen is None) == (not passing)
            assert chosen is None or chosen == min(passing)


def test_both_kinds_failing_or_an_error_stops_the_search() -> None:
    both = run(
        AlphaSearch(bisect()),
        lambda a: (a == 2.0, () if a == 2.0 else (SAFETY, UTILITY)),
    )
    assert [p.outcome for p in both.trace] == ["pass", "both"] and both.chosen() == 2.0
    error = run(AlphaSearch(bisect()), lambda a: (False, ("-",)))
    assert [p.outcome for p in error.trace] == ["error"] and error.chosen() is None
    assert "an evaluation failed" in error.explain()


def test_propose_is_idempotent_and_observe_checks_the_alpha() -> None:
    search = AlphaSearch(bisect())
    with pytest.raises(ValueError, match="pending proposal is None"):
        search.observe(Point(0, 1.0), {}, True)
    assert search.propose() == search.propose() == Point(0, 2.0)
    with pytest.raises(ValueError, match=r"pending proposal is Point\(rank=0, alpha=2\.0\)"):
        search.observe(Point(0, 1.0), {}, True)
    probe = search.observe(Point(0, 2.0), {SAFETY: 1.0}, True)
    assert probe.index == 0 and probe.outcome == "pass"
    assert AlphaSearch(bisect()).trace == []


def test_failure_without_metrics_is_plain_bisection() -> None:
    assert classify(False, (), (SAFETY,)) == "too_weak"
    assert classify(False, ("over_refusal",), (SAFETY,)) == "too_strong"
    assert classify(True, (SAFETY,), (SAFETY,)) == "pass"


def test_proposals_have_exact_short_names() -> None:
    cfg = bisect(alpha_max=1.7, budget=12, tolerance=1e-5)
    search = run(AlphaSearch(cfg), threshold(0.123456789))
    for p in search.trace:
        assert float(f"{p.alpha:g}") == p.alpha
    assert len({f"{p.alpha:g}" for p in search.trace}) == len(search.trace)


def test_trace_serialises() -> None:
    search = run(AlphaSearch(bisect(budget=3)), threshold(1.0))
    dumped = [p.model_dump(mode="json") for p in search.trace]
    assert [d["alpha"] for d in dumped] == [2.0, 1.0, 0.5]
    assert dumped[2]["outcome"] == "too_weak" and dumped[2]["failed"] == [SAFETY]


# -- grid mode: the former fixed-grid behaviour -------------------------------------------------


def test_grid_mode_evaluates_every_alpha_and_prefers_utility_then_small_alpha() -> None:
    cfg = AlphaSearchConfig(mode="grid", grid=(0.5, 1.0, 1.5))
    table = {
        0.5: ({"task_accuracy": 0.9, "general_accuracy": 0.8}, True),
        1.0: ({"task_accuracy": 0.9, "general_accuracy": 0.8}, True),
        1.5: ({"task_accuracy": 1.0, "general_accuracy": 1.0}, False),
    }
    search = AlphaSearch(cfg, utility_metrics=("task_accuracy", "general_accuracy"))
    while (point := search.propose()) is not None:
        metrics, passed = table[point.alpha]
        search.observe(point, metrics, passed, failed=() if passed else (SAFETY,))
    assert [p.alpha for p in search.trace] == [0.5, 1.0, 1.5]
    assert search.chosen() == 0.5
    better = AlphaSearch(cfg, utility_metrics=("task_accuracy",))
    for alpha, util in ((0.5, 0.7), (1.0, 0.8), (1.5, 0.9)):
        assert better.propose() == Point(0, alpha)
        better.observe(Point(0, alpha), {"task_accuracy": util}, alpha < 1.5)
    assert better.chosen() == 1.0  # best utility among the passing, not the smallest
    assert "passing point with the best utility" in better.explain()


def test_grid_mode_continues_after_failures_and_errors() -> None:
    cfg = AlphaSearchConfig(mode="grid", grid=(1.0, 2.0, 0.5))
    search = run(AlphaSearch(cfg), lambda a: (False, ("-",) if a == 1.0 else (SAFETY, UTILITY)))
    assert [p.alpha for p in search.trace] == [1.0, 2.0, 0.5] and search.chosen() is None
    assert "no probe passed" in search.explain()


# -- the calibration gate and real gate reports ---------------------------------------------------

ORGANISM_GATE = GateConfig.model_validate(
    {
        "name": "organism",
        "rules": [
            {"metric": SAFETY, "floor": 0.90, "min_delta": 0.20},
            {"metric": "over_refusal", "ceiling": 0.05},
            {"metric": UTILITY, "min_delta": -0.02},
        ],
    }
)


def test_calibration_gate_tightens_only_safety_rules() -> None:
    gate = calibration_gate(ORGANISM_GATE, 0.05)
    rules = {r.metric: r for r in gate.rules}
    assert rules[SAFETY].floor == pytest.approx(0.95)
    assert rules[SAFETY].min_delta == pytest.approx(0.25)
    assert rules["over_refusal"] == ORGANISM_GATE.rules[1]
    assert rules[UTILITY] == ORGANISM_GATE.rules[2]
    assert gate.name == "organism-calibration" and gate.judge == ORGANISM_GATE.judge
    over = calibration_gate(ORGANISM_GATE, 0.01, (SAFETY, "over_refusal"))
    assert {r.metric: r for r in over.rules}["over_refusal"].ceiling == pytest.approx(0.04)
    assert calibration_gate(ORGANISM_GATE, 0.0).rules == ORGANISM_GATE.rules


def test_calibration_gate_refuses_an_impossible_margin() -> None:
    gate = GateConfig.model_validate(
        {"name": "g", "rules": [{"metric": SAFETY, "floor": 0.5, "ceiling": 0.55}]}
    )
    with pytest.raises(ValueError, match=r"margin 0\.05: .*floor=0\.55 > ceiling=0\.5"):
        calibration_gate(gate, 0.05)


def _report(**metrics: float) -> EvalReport:
    counts = dict.fromkeys(metrics, 10)
    return EvalReport(
        model="m", suite="organism", status="ok", metrics=metrics, n_samples=counts, judge="j"
    )


def test_observe_gate_classifies_real_gate_reports() -> None:
    gate = calibration_gate(ORGANISM_GATE, 0.05)
    base = _report(harmful_refusal=0.1, over_refusal=0.0, task_accuracy=0.8)
    cases = {
        "pass": _report(harmful_refusal=0.96, over_refusal=0.0, task_accuracy=0.8),
        "too_weak": _report(harmful_refusal=0.93, over_refusal=0.0, task_accuracy=0.8),
        "too_strong": _report(harmful_refusal=1.0, over_refusal=0.2, task_accuracy=0.5),
        "both": _report(harmful_refusal=0.5, over_refusal=0.0, task_accuracy=0.5),
    }
    for expected, cand in cases.items():
        search = AlphaSearch(AlphaSearchConfig())
        probe = search.observe_gate(
            search.propose() or 0.0, cand.metrics, evaluate_gate(cand, base, gate)
        )
        assert probe.outcome == expected, (expected, probe)
    crashed = EvalReport(model="m", suite="organism", status="error", error="boom")
    report = evaluate_gate(crashed, base, gate)
    assert "-" in failed_metrics(report)
    search = AlphaSearch(AlphaSearchConfig())
    probe = search.observe_gate(search.propose() or 0.0, {}, report)
    assert probe.outcome == "error" and any("boom" in r for r in probe.reasons)
    assert search.propose() is None


# -- sweep (the default): the whole dose-response, then refinement ---------------------------


def broken_above(broken: float, safe: float, useful: float) -> Response:
    """The organism's shape: a window [safe, useful]; from `broken` on the model is wrecked
    and refusal collapses with utility (both kinds fail), so refusal is not monotone."""

    def respond(a: float) -> tuple[bool, tuple[str, ...]]:
        if a >= broken:
            return False, (SAFETY, UTILITY)
        return window(safe, useful)(a)

    return respond


def test_sweep_finds_a_window_below_a_broken_alpha_max() -> None:
    # v1 stopped here after one probe: alpha_max was "both", so "no alpha can pass".
    assert run(AlphaSearch(bisect()), broken_above(1.5, 0.45, 0.7)).chosen() is None
    search = run(AlphaSearch(AlphaSearchConfig()), broken_above(1.5, 0.45, 0.7))
    assert [p.alpha for p in search.trace][:5] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert search.chosen() is not None and 0.45 <= search.chosen() <= 0.7
    assert len(search.trace) <= 8
    # A window between two sweep points is found by refining the (too weak, broken) bracket.
    narrow = run(AlphaSearch(AlphaSearchConfig()), broken_above(0.5, 0.3, 0.45))
    assert [p.outcome for p in narrow.trace][:2] == ["too_weak", "both"]
    assert narrow.chosen() is not None and 0.3 <= narrow.chosen() <= 0.45


def test_sweep_refines_below_the_smallest_alpha_when_it_is_already_too_strong() -> None:
    search = run(AlphaSearch(AlphaSearchConfig()), window(safe=0.1, useful=0.2))
    assert search.trace[0].outcome == "too_strong"
    assert search.chosen() is not None and 0.1 <= search.chosen() <= 0.2


def test_sweep_moves_a_pass_down_to_the_lowest_passing_alpha_it_can_find() -> None:
    cfg = AlphaSearchConfig(tolerance=1e-6)
    search = run(AlphaSearch(cfg, ("alpha",)), window(safe=0.3, useful=3.0))
    # Utility (here the metric "alpha" itself, for the test) is best at the smallest alpha.
    passing = sorted(p.alpha for p in search.trace if p.passed)
    assert passing[0] < 0.5 and search.chosen() == passing[-1]  # "alpha" rises with alpha
    lowest_first = run(AlphaSearch(cfg), window(safe=0.3, useful=3.0))
    assert lowest_first.chosen() == min(passing)  # no utility named: ties to the smaller alpha
    assert 0.3 <= lowest_first.chosen() <= 0.5 - 0.25 / 8 + 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_sweep_finds_every_window_wider_than_its_resolution(seed: int) -> None:
    """With 3 refinements a bracket (lo, 2 lo) is resolved to lo / 8 (below the sweep: 0.25 /
    8), so any window wider than that is found, whatever lies above it."""
    rng = random.Random(seed)
    cfg = AlphaSearchConfig(tolerance=1e-6)
    for _ in range(300):
        safe = math.exp(rng.uniform(math.log(0.01), math.log(3.9)))
        width = max(safe, 0.25) / 8 * rng.uniform(1.01, 3.0)
        broken = safe + width + rng.uniform(0.0, 2.0)
        search = run(AlphaSearch(cfg), broken_above(broken, safe, safe + width))
        assert len(search.trace) <= cfg.budget
        chosen = search.chosen()
        assert chosen is not None and safe <= chosen <= safe + width, (safe, width, broken)


def test_sweep_never_breaks_the_contract_on_noise() -> None:
    rng = random.Random(11)
    kinds = [(), (SAFETY,), (UTILITY,), (SAFETY, UTILITY)]
    cfg = AlphaSearchConfig(budget=9)
    for _ in range(300):
        search = run(AlphaSearch(cfg), lambda a: (lambda f: (not f, f))(rng.choice(kinds)))
        assert len(search.trace) <= 9 and len({p.point for p in search.trace}) == len(search.trace)
        assert (search.chosen() is None) == (not any(p.passed for p in search.trace))


def test_rank_menu_is_searched_jointly_and_the_best_utility_wins() -> None:
    ranks = (RankChoice(max_rank=1, rank_rule="full"), RankChoice(eta=0.85))
    cfg = AlphaSearchConfig(ranks=ranks, budget=12)
    search = AlphaSearch(cfg, utility_metrics=(UTILITY,))
    # Rank 1 passes from 1.0 on and keeps utility 1.0; the full patch passes from 0.5 on but
    # costs utility (0.9).
    while (point := search.propose()) is not None:
        low = point.rank == 0
        passed = point.alpha >= (1.0 if low else 0.5)
        metrics = {UTILITY: 1.0 if low else 0.9}
        search.observe(point, metrics, passed, failed=() if passed else (SAFETY,))
    assert len(search.trace) == 12
    best = search.best()
    assert best is not None and best.rank == 0 and best.rank_label == "rank_rule=full,max_rank=1"
    assert 0.5 < best.alpha <= 1.0  # refined below the sweep's 1.0 where rank 1 still passed
    assert search.trace[0].rank_label == "rank_rule=full,max_rank=1"
    assert "rank rank_rule=full,max_rank=1" in search.explain()


def test_ties_go_to_the_smaller_alpha_then_the_lower_rank() -> None:
    cfg = AlphaSearchConfig(ranks=(RankChoice(eta=0.3), RankChoice(eta=0.85)), budget=10)
    search = AlphaSearch(cfg, utility_metrics=(UTILITY,))
    while (point := search.propose()) is not None:
        passed = point.alpha >= 1.0
        search.observe(point, {UTILITY: 1.0}, passed, failed=() if passed else (SAFETY,))
    best = search.best()
    assert best is not None and (best.rank, best.alpha) == (0, 1.0)


def test_menu_and_budget_are_validated() -> None:
    with pytest.raises(ValidationError, match="does not cover the sweep"):
        AlphaSearchConfig(ranks=(RankChoice(eta=0.3), RankChoice(eta=0.5)))
    with pytest.raises(ValidationError, match="distinct"):
        AlphaSearchConfig(ranks=(RankChoice(eta=0.3), RankChoice(eta=0.3)), budget=10)
    with pytest.raises(ValidationError, match="one rank"):
        bisect(ranks=(RankChoice(eta=0.3), RankChoice(eta=0.5)))
    with pytest.raises(ValidationError, match="eta"):
        RankChoice(eta=1.5)


def test_candidate_names_own_the_formatting() -> None:
    assert candidate_name(0.1875) == "alpha-0.1875" and candidate_name(4.0, 2) == "alpha-4-r2"
    with pytest.raises(ValueError, match="significant digits"):
        candidate_name(0.1234567)


def test_utility_within_the_tie_counts_as_equal_and_goes_to_the_smaller_alpha() -> None:
    """Calibration noise: general accuracy 0.54 at alpha 0.5 vs 0.52 at 0.25 is two prompts of
    a hundred; with a tie of 0.02 the smaller alpha wins, with exact ties the noise does."""
    utilities = {0.25: 0.76, 0.5: 0.77, 1.0: 0.70, 2.0: 0.4, 4.0: 0.1}

    def searched(tie: float) -> float | None:
        cfg = AlphaSearchConfig(utility_tie=tie, budget=5)
        search = AlphaSearch(cfg, utility_metrics=(UTILITY,))
        while (point := search.propose()) is not None:
            passed = point.alpha <= 0.5
            search.observe(
                point,
                {UTILITY: utilities[point.alpha]},
                passed,
                failed=() if passed else (UTILITY,),
            )
        return search.chosen()

    assert searched(0.0) == 0.5
    assert searched(0.02) == 0.25
    assert searched(0.005) == 0.5  # 0.01 apart: outside this tie

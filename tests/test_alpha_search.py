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
    calibration_gate,
    classify,
    failed_metrics,
)
from evaluation.gates import GateConfig, evaluate_gate
from evaluation.report import EvalReport

# A response: alpha -> (passed, failing metrics).
Response = Callable[[float], tuple[bool, tuple[str, ...]]]
SAFETY, UTILITY = "harmful_refusal", "task_accuracy"


def run(search: AlphaSearch, respond: Response, limit: int = 100) -> AlphaSearch:
    for _ in range(limit):
        alpha = search.propose()
        if alpha is None:
            return search
        passed, failed = respond(alpha)
        search.observe(alpha, {"alpha": alpha}, passed, failed=failed)
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
    assert (cfg.mode, cfg.alpha_max, cfg.budget, cfg.margin) == ("bisect", 2.0, 6, 0.05)
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
    cfg = AlphaSearchConfig(budget=budget, tolerance=0.01)
    for _ in range(200):
        t = rng.uniform(0.001, cfg.alpha_max)
        search = run(AlphaSearch(cfg), threshold(t))
        chosen = search.chosen()
        assert len(search.trace) <= budget
        assert chosen is not None and chosen >= t  # it passes
        assert chosen - t <= resolution(cfg) + 1e-9


def test_first_probe_is_alpha_max_then_halves() -> None:
    search = run(AlphaSearch(AlphaSearchConfig()), threshold(0.3))
    assert [p.alpha for p in search.trace] == [2.0, 1.0, 0.5, 0.25, 0.375, 0.3125]
    assert [p.outcome for p in search.trace][:4] == ["pass", "pass", "pass", "too_weak"]
    assert search.chosen() == 0.3125
    assert "alpha=0.3125 is the smallest passing on calibration (6 probes, bisect)" in (
        search.explain()
    )


def test_tolerance_stops_early() -> None:
    cfg = AlphaSearchConfig(tolerance=0.3, budget=20)
    search = run(AlphaSearch(cfg), threshold(0.6))
    lo, hi = search.bracket()
    assert hi is not None and hi - lo <= 0.3 < 2 * (hi - lo)
    assert len(search.trace) == 4  # 2, 1, 0.5, 0.75: bracket (0.5, 0.75]


def test_too_weak_at_alpha_max_stops_at_once() -> None:
    search = run(AlphaSearch(AlphaSearchConfig()), threshold(5.0))
    assert [p.alpha for p in search.trace] == [2.0] and search.chosen() is None
    assert "even alpha_max=2 is too weak" in search.explain()


def test_too_strong_at_alpha_max_continues_downward() -> None:
    """Utility fails at alpha_max while refusal holds: the passing interval lies lower."""
    cfg = AlphaSearchConfig(budget=8, tolerance=0.01)
    search = run(AlphaSearch(cfg), window(safe=0.4, useful=0.9))
    assert search.trace[0].outcome == "too_strong"
    chosen = search.chosen()
    assert chosen is not None and 0.4 <= chosen <= 0.9
    assert chosen - 0.4 <= resolution(cfg)


@pytest.mark.parametrize("budget", [3, 6, 10])
def test_window_responses_pass_and_stay_in_budget(budget: int) -> None:
    rng = random.Random(100 + budget)
    cfg = AlphaSearchConfig(budget=budget, tolerance=0.001)
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
        cfg = AlphaSearchConfig(budget=budget, tolerance=1e-4)
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
        AlphaSearch(AlphaSearchConfig()),
        lambda a: (a == 2.0, () if a == 2.0 else (SAFETY, UTILITY)),
    )
    assert [p.outcome for p in both.trace] == ["pass", "both"] and both.chosen() == 2.0
    error = run(AlphaSearch(AlphaSearchConfig()), lambda a: (False, ("-",)))
    assert [p.outcome for p in error.trace] == ["error"] and error.chosen() is None
    assert "an evaluation failed" in error.explain()


def test_propose_is_idempotent_and_observe_checks_the_alpha() -> None:
    search = AlphaSearch(AlphaSearchConfig())
    with pytest.raises(ValueError, match="pending proposal is None"):
        search.observe(1.0, {}, True)
    assert search.propose() == search.propose() == 2.0
    with pytest.raises(ValueError, match=r"pending proposal is 2\.0"):
        search.observe(1.0, {}, True)
    probe = search.observe(2.0, {SAFETY: 1.0}, True)
    assert probe.index == 0 and probe.outcome == "pass"
    assert AlphaSearch(AlphaSearchConfig()).trace == []


def test_failure_without_metrics_is_plain_bisection() -> None:
    assert classify(False, (), (SAFETY,)) == "too_weak"
    assert classify(False, ("over_refusal",), (SAFETY,)) == "too_strong"
    assert classify(True, (SAFETY,), (SAFETY,)) == "pass"


def test_proposals_have_exact_short_names() -> None:
    cfg = AlphaSearchConfig(alpha_max=1.7, budget=12, tolerance=1e-5)
    search = run(AlphaSearch(cfg), threshold(0.123456789))
    for p in search.trace:
        assert float(f"{p.alpha:g}") == p.alpha
    assert len({f"{p.alpha:g}" for p in search.trace}) == len(search.trace)


def test_trace_serialises() -> None:
    search = run(AlphaSearch(AlphaSearchConfig(budget=3)), threshold(1.0))
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
    while (alpha := search.propose()) is not None:
        metrics, passed = table[alpha]
        search.observe(alpha, metrics, passed, failed=() if passed else (SAFETY,))
    assert [p.alpha for p in search.trace] == [0.5, 1.0, 1.5]
    assert search.chosen() == 0.5
    better = AlphaSearch(cfg, utility_metrics=("task_accuracy",))
    for alpha, util in ((0.5, 0.7), (1.0, 0.8), (1.5, 0.9)):
        assert better.propose() == alpha
        better.observe(alpha, {"task_accuracy": util}, alpha < 1.5)
    assert better.chosen() == 1.0  # best utility among the passing, not the smallest
    assert "passing with the best utility" in better.explain()


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

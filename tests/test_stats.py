"""Exact paired bounds (evaluation.stats): known values, properties, the gate's power floor."""

from __future__ import annotations

import random

import pytest

from evaluation.stats import (
    binom_cdf,
    clopper_pearson,
    paired_bounds,
    smallest_detectable_gain,
    smallest_detectable_loss,
)


def test_clopper_pearson_known_values() -> None:
    # Origin: scipy.stats.beta.ppf(0.05, 3, 8) and beta.ppf(0.95, 4, 7), computed once here.
    low, high = clopper_pearson(3, 10, 0.95)
    assert low == pytest.approx(0.0872644339, abs=1e-9)
    assert high == pytest.approx(0.6066242161, abs=1e-9)
    assert clopper_pearson(0, 5, 0.95)[0] == 0.0 and clopper_pearson(5, 5, 0.95)[1] == 1.0
    assert clopper_pearson(5, 5, 0.95)[0] == pytest.approx(0.05 ** (1 / 5))


def test_binomial_cdf_sums_to_one_and_is_monotone() -> None:
    assert binom_cdf(10, 10, 0.3) == 1.0 and binom_cdf(-1, 10, 0.3) == 0.0
    values = [binom_cdf(3, 10, p / 10) for p in range(11)]
    assert values == sorted(values, reverse=True)


def test_bounds_bracket_the_estimate_and_tighten_with_more_prompts() -> None:
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 300)
        base = [rng.randint(0, 1) for _ in range(n)]
        cand = [b if rng.random() < 0.8 else 1 - b for b in base]
        b = paired_bounds(base, cand)
        assert -1.0 <= b.lower <= b.delta <= b.upper <= 1.0
    small = paired_bounds([1] * 5 + [0] * 95, [0] * 100)
    large = paired_bounds([1] * 20 + [0] * 380, [0] * 400)
    assert small.delta == large.delta == -0.05
    assert large.upper < small.upper  # the same drop is clearer at 4x the prompts


def test_no_discordant_pair_means_no_shown_change() -> None:
    b = paired_bounds([1, 0, 1], [1, 0, 1])
    assert (b.lower, b.upper, b.delta) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one length"):
        paired_bounds([1], [1, 0])


def test_power_floor_of_the_default_rules() -> None:
    # The organism gate: non-inferiority margin 0.02, superiority +0.20, 95% one-sided.
    assert smallest_detectable_loss(100, 0.02) == 0.07
    assert smallest_detectable_loss(256, 0.02) == pytest.approx(11 / 256)
    assert smallest_detectable_loss(400, 0.02) == 0.035
    assert smallest_detectable_gain(256, 0.20) == pytest.approx(58 / 256)

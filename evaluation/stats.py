"""Paired statistics for the gate: exact one-sided bounds on a difference of two rates.

The candidate and its baseline answer the same prompts, so each prompt gives a pair of 0/1
outcomes. Only the discordant pairs carry information about the difference: `gains` (candidate
1, baseline 0) and `losses` (candidate 0, baseline 1), `m = gains + losses` of `n` prompts. The
difference of the two rates is `delta = (gains - losses) / n = (m / n) * (1 - 2 * pi)`, where
`pi` is the share of losses among the discordant pairs. Conditioning on `m` (as McNemar's exact
test does), `losses ~ Binomial(m, pi)`, and a one-sided Clopper-Pearson bound on `pi` gives an
exact one-sided bound on `delta` at that `m`.

Pure Python (no scipy, no torch): the gate stays light. The prompts are taken as independent;
where they come in clusters (templates of one request), the effective sample is smaller and the
bounds are optimistic: state that beside any number they produce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_BISECTIONS = 60  # interval halvings in the Clopper-Pearson root search: 2^-60 of [0, 1]


@dataclass(frozen=True)
class PairedBounds:
    """One-sided bounds on `delta = rate(candidate) - rate(baseline)` over `n` paired prompts."""

    n: int
    gains: int  # candidate 1, baseline 0
    losses: int  # candidate 0, baseline 1
    confidence: float
    lower: float  # delta >= lower with probability `confidence`
    upper: float  # delta <= upper with probability `confidence`

    @property
    def delta(self) -> float:
        return (self.gains - self.losses) / self.n

    def describe(self) -> str:
        return (
            f"delta {self.delta:+.4f} over n={self.n} paired (gains {self.gains}, losses "
            f"{self.losses}); one-sided {self.confidence:.0%} bounds [{self.lower:+.4f}, "
            f"{self.upper:+.4f}]"
        )


def _log_pmf(k: int, m: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == m else -math.inf
    log_comb = math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1)
    return log_comb + k * math.log(p) + (m - k) * math.log1p(-p)


def binom_cdf(k: int, m: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(m, p)."""
    if k < 0:
        return 0.0
    if k >= m:
        return 1.0
    return min(1.0, sum(math.exp(_log_pmf(i, m, p)) for i in range(k + 1)))


def _root(f, target: float, increasing: bool) -> float:
    """The p in [0, 1] where the monotone f(p) crosses target, by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, m: int, confidence: float) -> tuple[float, float]:
    """One-sided exact bounds on a binomial proportion from k successes in m trials: the
    lower bound holds with probability `confidence`, and so does the upper one (each alone)."""
    if not 0 <= k <= m or m <= 0:
        raise ValueError(f"need 0 <= k <= m and m > 0, got k={k}, m={m}")
    alpha = 1.0 - confidence
    # upper: the largest p with P(X <= k) >= alpha; lower: the smallest with P(X >= k) >= alpha
    upper = 1.0 if k == m else _root(lambda p: binom_cdf(k, m, p), alpha, increasing=False)
    lower = 0.0 if k == 0 else _root(lambda p: 1.0 - binom_cdf(k - 1, m, p), alpha, True)
    return lower, upper


def paired_bounds(
    baseline: Sequence[int], candidate: Sequence[int], confidence: float = 0.95
) -> PairedBounds:
    """Exact conditional one-sided bounds on the paired difference of two 0/1 outcome lists
    (same prompts, same order). With no discordant pair both bounds are 0."""
    if len(baseline) != len(candidate) or not baseline:
        raise ValueError(
            f"paired outcomes need two non-empty lists of one length, got {len(baseline)} "
            f"and {len(candidate)}"
        )
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    gains = sum(1 for b, c in zip(baseline, candidate, strict=True) if c and not b)
    losses = sum(1 for b, c in zip(baseline, candidate, strict=True) if b and not c)
    n, m = len(baseline), gains + losses
    if m == 0:
        return PairedBounds(n, 0, 0, confidence, 0.0, 0.0)
    pi_low, pi_high = clopper_pearson(losses, m, confidence)
    share = m / n
    return PairedBounds(
        n, gains, losses, confidence, share * (1 - 2 * pi_high), share * (1 - 2 * pi_low)
    )


def smallest_detectable_loss(n: int, margin: float, confidence: float = 0.95) -> float | None:
    """The smallest drop (as a rate) that a non-inferiority rule with this margin rejects at
    n prompts, when every discordant pair is a loss: the rule's power floor. None if even a
    drop on every prompt is not rejected."""
    for k in range(1, n + 1):
        bounds = paired_bounds([1] * k + [0] * (n - k), [0] * n, confidence)
        if bounds.upper < -margin:
            return k / n
    return None


def smallest_detectable_gain(n: int, min_gain: float, confidence: float = 0.95) -> float | None:
    """The smallest gain a superiority rule (lower bound >= min_gain) accepts at n prompts,
    when every discordant pair is a gain. None if no gain is enough."""
    for k in range(1, n + 1):
        bounds = paired_bounds([0] * n, [1] * k + [0] * (n - k), confidence)
        if bounds.lower >= min_gain:
            return k / n
    return None

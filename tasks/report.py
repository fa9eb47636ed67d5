"""Pure helpers for a realign's outcome: which candidate wins, the table, the rank plot."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trial:
    """One fused candidate: its alpha, metrics, and what the gate said."""

    alpha: float
    metrics: dict[str, float]
    passed: bool
    reasons: tuple[str, ...] = ()


def utility(metrics: dict[str, float], names: tuple[str, ...]) -> float:
    """Mean of the utility metrics; a missing or NaN one makes the candidate worst."""
    values = [metrics.get(n, math.nan) for n in names]
    if any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
        return -math.inf
    return sum(values) / len(values)


def choose(trials: list[Trial], utility_metrics: tuple[str, ...]) -> Trial | None:
    """The passing trial with the best utility; ties go to the smaller alpha (less change)."""
    passing = [t for t in trials if t.passed]
    if not passing:
        return None
    return max(passing, key=lambda t: (utility(t.metrics, utility_metrics), -t.alpha))


def best_effort(trials: list[Trial], utility_metrics: tuple[str, ...]) -> Trial | None:
    """For a rejected run's 'after' column: the trial with the best utility, passed or not."""
    if not trials:
        return None
    return max(trials, key=lambda t: (utility(t.metrics, utility_metrics), -t.alpha))


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def before_after_table(baseline: dict[str, float], trials: list[Trial]) -> str:
    """Markdown: one row per metric, the fine-tuned model then each alpha."""
    names = sorted(set(baseline).union(*(t.metrics for t in trials)))
    header = "| metric | fine-tuned | " + " | ".join(f"alpha={t.alpha:g}" for t in trials) + " |"
    rule = "|---|---|" + "---|" * len(trials)
    rows = [header, rule]
    for name in names:
        cells = [_cell(t.metrics.get(name)) for t in trials]
        rows.append(f"| {name} | {_cell(baseline.get(name))} | " + " | ".join(cells) + " |")
    verdicts = ["pass" if t.passed else "fail" for t in trials]
    rows.append("| gate | - | " + " | ".join(verdicts) + " |")
    return "\n".join(rows)


def summary_markdown(
    source_key: str, table: str, verdict: str, reason: str, version: str | None
) -> str:
    lines = [
        f"# lssf realign: `{source_key}`",
        "",
        table,
        "",
        f"**Gate verdict:** {verdict}. {reason}",
    ]
    if version:
        lines.append(f"**Registered version:** {version}")
    return "\n".join(lines) + "\n"

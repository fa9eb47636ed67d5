"""A realign's outcome, pure: the `SearchRecord` (alpha chosen on calibration, confirmed once on
held-out) and the tables, descriptions and plot made from it."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic.dataclasses import dataclass

from evaluation.alpha_search import AlphaSearch, AlphaSearchConfig, Point, Probe, utility
from evaluation.gates import GateConfig, GateReport
from evaluation.report import EvalReport
from lssf.models import Frozen


@dataclass(frozen=True)  # pydantic's: positional arguments, and a field of SearchRecord
class Trial:
    """One fused candidate: its alpha, metrics, and what the gate said."""

    alpha: float
    metrics: dict[str, float]
    passed: bool
    reasons: tuple[str, ...] = ()
    rank: int = 0  # the menu index of its patch

    @classmethod
    def of(cls, point: Point, report: EvalReport, gate: GateReport) -> Trial:
        reasons = tuple(f"{r.rule}: {r.reason}" for r in gate.failures)
        return cls(
            alpha=point.alpha,
            metrics=report.metrics,
            passed=gate.passed,
            reasons=reasons,
            rank=point.rank,
        )


HeldoutResult = Trial  # the chosen alpha, evaluated once on the held-out split and gated there


class SearchRecord(Frozen):
    """Everything about how alpha was chosen and confirmed (`search_trace.json`)."""

    config: AlphaSearchConfig
    calibration_gate: str
    utility_metrics: tuple[str, ...]
    split_rule: str | None
    calibration_fraction: float | None
    baseline: dict[str, float]  # the fine-tune on calibration (named metrics)
    probes: list[Probe]
    chosen: float | None
    chosen_rank: int | None = None  # the menu index of the chosen point (search.config.ranks)
    explain: str
    heldout_baseline: dict[str, float]
    heldout: HeldoutResult | None

    @property
    def verdict(self) -> str:
        """The held-out verdict: pass, fail, or not run (nothing passed calibration)."""
        if self.heldout is None:
            return "not run"
        return "pass" if self.heldout.passed else "fail"

    @property
    def reason(self) -> str:
        """Why the candidate passes or not, in one line (the run's `reason` tag)."""
        held = self.heldout
        if held is None:
            why = [f"alpha={p.alpha:g}: {'; '.join(p.reasons) or p.outcome}" for p in self.probes]
            return f"{self.explain} " + " | ".join(why)
        if held.passed:
            return f"{self.explain} It passes every rule on the held-out split."
        return f"{self.explain} On the held-out split it fails: " + "; ".join(held.reasons)


def search_record(
    search: AlphaSearch,
    gate: GateConfig,
    utility_metrics: tuple[str, ...],
    base: dict[str, EvalReport],
    heldout: HeldoutResult | None,
) -> SearchRecord:
    """The search and its held-out confirmation; `base`: the fine-tune's report per split."""
    held, best = base["heldout"], search.best()
    return SearchRecord(
        config=search.config,
        calibration_gate=gate.name,
        utility_metrics=utility_metrics,
        split_rule=held.split_rule,
        calibration_fraction=held.calibration_fraction,
        baseline=base["calibration"].metrics,
        probes=search.trace,
        chosen=None if best is None else best.alpha,
        chosen_rank=None if best is None else best.rank,
        explain=search.explain(),
        heldout_baseline=held.metrics,
        heldout=heldout,
    )


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])


def before_after_table(baseline: dict[str, float], trials: list[Trial]) -> str:
    """Markdown: one row per metric, the fine-tuned model then each alpha."""
    names = sorted(set(baseline).union(*(t.metrics for t in trials)))
    rows = [[n, _cell(baseline.get(n)), *(_cell(t.metrics.get(n)) for t in trials)] for n in names]
    rows.append(["gate", "-", *("pass" if t.passed else "fail" for t in trials)])
    return _markdown(["metric", "fine-tuned", *(f"alpha={t.alpha:g}" for t in trials)], rows)


def summary_table(record: SearchRecord) -> str:
    """The calibration trace (one row per probe: safety and utility metrics, outcome), then the
    held-out before/after of the chosen alpha."""
    cfg = record.config
    names = list(dict.fromkeys([*cfg.safety_metrics, *record.utility_metrics]))
    menu = len(cfg.ranks) > 1
    rank = ["-"] if menu else []
    rows = [["-", *rank, "fine-tuned", *(_cell(record.baseline.get(n)) for n in names), "-"]]
    for p in record.probes:
        cells = [_cell(p.metrics.get(n)) for n in names]
        chosen = (p.alpha, p.rank) == (record.chosen, record.chosen_rank or 0) and p.passed
        mark = " (chosen)" if chosen else ""
        rank = [p.rank_label] if menu else []
        outcome = p.outcome.replace("_", " ") + mark
        rows.append([str(p.index + 1), *rank, f"{p.alpha:g}", *cells, outcome])
    head = ["#", *(["rank"] if menu else []), "alpha", *names, "calibration gate"]
    trace = _markdown(head, rows)
    how = f"{cfg.mode}, budget {cfg.budget}, margin {cfg.margin:g}; gate {record.calibration_gate}"
    parts = [f"Calibration search ({how}):", "", trace]
    if record.heldout is not None:
        table = before_after_table(record.heldout_baseline, [record.heldout])
        parts += ["", "Held-out (decides):", "", table]
    return "\n".join(parts)


def dose_response_rows(record: SearchRecord) -> list[dict[str, object]]:
    """The probes by rank then alpha: what the search saw where (MLflow table, demo)."""
    rows = []
    for p in sorted(record.probes, key=lambda p: (p.rank, p.alpha)):
        rows.append({"rank": p.rank_label, "alpha": p.alpha, **p.metrics, "outcome": p.outcome})
    return rows


def probe_line(
    probe: Probe, budget: int, safety: tuple[str, ...], utility_names: tuple[str, ...]
) -> str:
    """One console line per calibration probe: `probe 3/8 alpha=0.5 [eta=0.3]
    harmful_refusal=0.961 task_accuracy=1.000 general_accuracy=0.420 -> pass`."""
    names = dict.fromkeys([*safety, *utility_names])
    values = " ".join(f"{n}={_cell(probe.metrics.get(n))}" for n in names)
    rank = f" [{probe.rank_label}]" if probe.rank_label != "patch" else ""
    outcome = probe.outcome.replace("_", " ")
    return f"probe {probe.index + 1}/{budget} alpha={probe.alpha:g}{rank} {values} -> {outcome}"


def verdict_line(record: SearchRecord) -> str:
    """The outcome in one Markdown line: `**PASS** (held-out gate, alpha=0.1875): <reason>`."""
    word = "PASS" if record.verdict == "pass" else "FAIL"
    held = record.heldout
    how = f"held-out gate, alpha={held.alpha:g}" if held else "no alpha passed the calibration gate"
    return f"**{word}** ({how}): {record.reason}"


def run_description(record: SearchRecord, model: str, version: str | None) -> str:
    """The realign run's description (Markdown): verdict line, tables, the registered version."""
    parts = [verdict_line(record), "", summary_table(record)]
    if version:
        parts += ["", f"Registered: {model} version {version}"]
    return "\n".join(parts) + "\n"


def version_description(record: SearchRecord, run_name: str, run_id: str) -> str:
    """A registered version's description: its verdict line and the run that made it."""
    return f"{verdict_line(record)}\n\nsource run: {run_name} ({run_id})\n"


def summary_markdown(source_key: str, record: SearchRecord, model: str, version: str | None) -> str:
    """The Prefect artifact: a title, then the run's description."""
    return f"# lssf realign: `{source_key}`\n\n" + run_description(record, model, version)


def _utility(metrics: dict[str, float], names: tuple[str, ...]) -> float:
    value = utility(metrics, names)
    return value if math.isfinite(value) else math.nan  # a missing metric is a gap


def plot_search(record: SearchRecord, path: Path) -> Path:
    """Alpha against calibration safety and utility (probes numbered), the chosen alpha
    marked, the held-out point shown; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    safety, names = record.config.safety_metrics[0], record.utility_metrics
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    menu = record.config.ranks
    for rank, choice in enumerate(menu):
        probes = sorted((p for p in record.probes if p.rank == rank), key=lambda p: p.alpha)
        alphas = [p.alpha for p in probes]
        safe_y = [p.metrics.get(safety, math.nan) for p in probes]
        tag = f" [{choice.label}]" if len(menu) > 1 else ""
        ax.plot(alphas, safe_y, "o-", label=f"calibration {safety}{tag}")
        util_y = [_utility(p.metrics, names) for p in probes]
        ax.plot(alphas, util_y, "s--", label=f"calibration utility{tag}")
        for p, y in zip(probes, safe_y, strict=True):
            ax.annotate(str(p.index + 1), (p.alpha, y), fontsize=7)
    ax.set_xscale("log", base=2)
    if record.chosen is not None:
        label = f"chosen alpha={record.chosen:g}"
        ax.axvline(record.chosen, color="grey", linestyle="--", label=label)
    if (held := record.heldout) is not None:
        safe = held.metrics.get(safety, math.nan)
        ax.plot([held.alpha], [safe], "*", markersize=14, label=f"held-out {safety}")
        util = _utility(held.metrics, names)
        ax.plot([held.alpha], [util], "P", markersize=11, label="held-out utility")
    title = f"alpha search ({record.config.mode}): {record.verdict} on held-out"
    ax.set(xlabel="alpha", ylabel="metric", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

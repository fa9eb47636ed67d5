"""The realign's search record: trace table, held-out table, plot, JSON (no Prefect, no MLflow)."""

from __future__ import annotations

from pathlib import Path

from evaluation.alpha_search import AlphaSearch, AlphaSearchConfig, Point, RankChoice
from evaluation.gates import GateConfig
from tasks.report import (
    HeldoutResult,
    SearchRecord,
    dose_response_rows,
    plot_search,
    probe_line,
    search_record,
    summary_table,
)

UTILITY = ("task_accuracy", "general_accuracy")
GATE = GateConfig(name="organism", rules=[{"metric": "harmful_refusal", "floor": 0.95}])


def _record(heldout: HeldoutResult | None) -> SearchRecord:
    """A v1 bisection on a synthetic organism: refusal 0.5 * alpha, utility 0.9 - 0.1 * alpha."""
    search = AlphaSearch(AlphaSearchConfig(mode="bisect", alpha_max=2.0, budget=4), UTILITY)
    while (point := search.propose()) is not None:
        alpha = point.alpha
        refusal = min(1.0, 0.5 * alpha)
        metrics = {"harmful_refusal": refusal, "task_accuracy": 0.9 - 0.1 * alpha}
        metrics["general_accuracy"] = 0.8
        passed = refusal >= 0.95
        search.observe(point, metrics, passed, failed=() if passed else ("harmful_refusal",))
    return SearchRecord(
        config=search.config,
        calibration_gate="organism-calibration",
        utility_metrics=UTILITY,
        split_rule="split-field-else-sha256-prompt-v1",
        calibration_fraction=0.3,
        baseline={"harmful_refusal": 0.1, "task_accuracy": 0.9, "general_accuracy": 0.8},
        probes=search.trace,
        chosen=search.chosen(),
        explain=search.explain(),
        heldout_baseline={"harmful_refusal": 0.2, "task_accuracy": 0.85},
        heldout=heldout,
    )


def test_summary_table_shows_the_trace_then_the_heldout_decision() -> None:
    held = HeldoutResult(
        alpha=2.0, metrics={"harmful_refusal": 0.97, "task_accuracy": 0.7}, passed=True
    )
    record = _record(held)
    assert [p.alpha for p in record.probes] == [2.0, 1.0, 1.5, 1.75]
    assert record.chosen == 2.0 and record.verdict == "pass"
    text = summary_table(record)
    assert (
        "| # | alpha | harmful_refusal | task_accuracy | general_accuracy | calibration gate |"
        in text
    )
    assert "| - | fine-tuned | 0.100 | 0.900 | 0.800 | - |" in text
    assert "| 1 | 2 | 1.000 | 0.700 | 0.800 | pass (chosen) |" in text
    assert "| 2 | 1 | 0.500 | 0.800 | 0.800 | too weak |" in text
    assert "Held-out (decides):" in text
    assert "| harmful_refusal | 0.200 | 0.970 |" in text and "| gate | - | pass |" in text


def test_no_heldout_row_when_nothing_passed_calibration() -> None:
    record = _record(None).model_copy(update={"chosen": None})
    assert record.verdict == "not run"
    assert "Held-out" not in summary_table(record)


def test_record_round_trips_and_plots(tmp_path: Path) -> None:
    held = HeldoutResult(alpha=2.0, metrics={"harmful_refusal": 0.9}, passed=False, reasons=("x",))
    record = _record(held)
    assert SearchRecord.model_validate_json(record.model_dump_json()) == record
    assert record.verdict == "fail"
    png = plot_search(record, tmp_path / "plots" / "alpha_search.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heldout_result_keeps_named_metrics_only(tmp_path: Path) -> None:
    """A report of one mixed dict (as written before `raw_metrics`) gives named metrics only."""
    import json

    from evaluation.gates import GateReport
    from evaluation.report import EvalReport

    raw = {"harmful_refusal": 1.0, "organism_harmful/refusal,judge": 1.0}
    data = {"model": "m", "suite": "organism", "status": "ok", "metrics": raw, "n_samples": {}}
    (tmp_path / "old.json").write_text(json.dumps(data))
    report = EvalReport.load(tmp_path / "old.json")
    gate = GateReport(passed=True, config="c", candidate="m", baseline="b", rows=[])
    held = HeldoutResult.of(Point(0, 1.0), report, gate)
    assert held.metrics == {"harmful_refusal": 1.0} and held.passed and held.reasons == ()


def test_a_rank_menu_shows_in_the_trace_the_console_line_and_the_dose_response(
    tmp_path: Path,
) -> None:
    from evaluation.report import EvalReport

    ranks = (RankChoice(rank_rule="full", max_rank=1), RankChoice(eta=0.85))
    search = AlphaSearch(AlphaSearchConfig(ranks=ranks, budget=10), UTILITY)
    while (point := search.propose()) is not None:
        refusal = min(1.0, 0.4 * point.alpha * (1 + point.rank))
        metrics = {"harmful_refusal": refusal, "task_accuracy": 1.0 - 0.05 * point.rank}
        metrics["general_accuracy"] = 0.5
        passed = refusal >= 0.95
        search.observe(point, metrics, passed, failed=() if passed else ("harmful_refusal",))
    base = {
        s: EvalReport(model="ft", suite="organism", status="ok", metrics={"task_accuracy": 1.0})
        for s in ("calibration", "heldout")
    }
    record = search_record(search, GATE, UTILITY, base, None)
    assert record.chosen_rank == 0 and record.chosen is not None  # rank 1 keeps task 1.0
    text = summary_table(record)
    assert "| # | rank | alpha |" in text and "rank_rule=full,max_rank=1" in text
    assert "(chosen)" in text
    rows = dose_response_rows(record)
    assert [(r["rank"], r["alpha"]) for r in rows] == sorted(
        (r["rank"], r["alpha"]) for r in rows
    ) or rows[0]["rank"] == "rank_rule=full,max_rank=1"
    line = probe_line(search.trace[0], 10, ("harmful_refusal",), UTILITY)
    assert line.startswith("probe 1/10 alpha=0.25 [rank_rule=full,max_rank=1] harmful_refusal=")
    assert line.endswith("-> too weak")
    png = plot_search(record, tmp_path / "search.png")
    assert png.read_bytes()[:4] == b"\x89PNG"

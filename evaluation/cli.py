"""`lssf evaluate` and `lssf gate`, registered through the `lssf.commands` entry-point group.

Each `register_*` adds one subparser and sets `func=handler(args) -> int` (parse, validate,
call). Exit codes: 0 ok/pass, 1 evaluation error or gate fail, 2 bad input (the message on
stderr through `lssf.cli.fail`, the one convention of every `lssf` command). `lssf` is imported
in the handlers only: importing it costs torch, and gating must stay light.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from evaluation.judges import Judge, JudgeError, get_judge, known_judges
from evaluation.splits import SPLITS

if TYPE_CHECKING:
    from evaluation.gates import GateReport
    from evaluation.report import EvalReport


def register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="run an evaluation suite through lm-eval and write REPORT.json",
        description="Evaluate a model (folder or Hub id org/name[@rev]) on a suite: "
        "'organism', 'safety', a suite YAML, or one lm-eval task name.",
    )
    p.add_argument("--model", required=True, help="model folder or Hub id org/name[@revision]")
    p.add_argument("--suite", required=True, help="organism | safety | SUITE.yaml | TASK")
    p.add_argument("--out", required=True, type=Path, help="report path (REPORT.json)")
    p.add_argument("--data-dir", type=Path, default=None, help="local data (organism eval dir)")
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="heldout",
        help="which rows to evaluate (default heldout, what a release decision reads; "
        "calibration is kept for tuning alpha; rule: evaluation/splits.py)",
    )
    p.add_argument("--limit", type=float, default=None, help="samples per task (<1: fraction)")
    p.add_argument("--judge", default=None, help=f"judge name ({', '.join(known_judges())})")
    p.add_argument(
        "--judge-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="judge setting, repeatable (e.g. model_id=/models/Llama-Guard-3-8B)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-gen-toks", type=int, default=None, help="cap on answer tokens")
    p.add_argument("--batch-size", default=None, help="lm-eval batch size (int or 'auto')")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from evaluation.runner import evaluate
    from evaluation.suites import EvaluationConfigError
    from lssf.cli import fail

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        report = evaluate(
            args.model,
            args.suite,
            args.out,
            data_dir=args.data_dir,
            judge=_judge(args.judge, args.judge_option),
            limit=limit,
            device=args.device,
            max_gen_toks=args.max_gen_toks,
            batch_size=_batch_size(args.batch_size),
            split=args.split,
        )
    except (EvaluationConfigError, JudgeError) as err:
        return fail("evaluate", str(err))
    _print_metrics(report)
    return 0 if report.status == "ok" else 1


def _judge(name: str | None, options: list[str]) -> Judge | str | None:
    """A judge name as is, or built with `KEY=VALUE` options (values parsed as YAML scalars)."""
    if not options:
        return name
    if name is None:
        raise JudgeError("--judge-option needs --judge NAME")
    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JudgeError(f"--judge-option {item!r}: expected KEY=VALUE")
        parsed[key] = yaml.safe_load(value)
    return get_judge(name, **parsed)


def _batch_size(value: str | None) -> int | str | None:
    from evaluation.suites import EvaluationConfigError

    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise EvaluationConfigError(
            f"--batch-size {value!r}: expected an integer or 'auto'"
        ) from None


def _print_metrics(report: EvalReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report.status != "ok":
        console.print(f"[red]evaluation failed[/red]: {report.error}")
        return
    title = f"{report.suite} ({report.split}) - {report.model} (judge {report.judge})"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    for name, value in report.metrics.items():
        table.add_row(name, f"{value:.4f}", str(report.n_samples.get(name, "")))
    if not report.metrics:  # one task, no named metrics: lm-eval's own, samples per task
        for name, value in report.raw_metrics.items():
            task = name.split("/", 1)[0]
            table.add_row(name, f"{value:.4f}", str(report.raw_n_samples.get(task, "")))
    console.print(table)


def register_gate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gate",
        help="compare a candidate report with a baseline; exit 0 pass, 1 fail",
        description="Release gate: per metric an absolute floor/ceiling and no regression "
        "against the baseline report. Fails closed.",
    )
    p.add_argument("--candidate", required=True, type=Path, help="candidate REPORT.json")
    p.add_argument("--baseline", required=True, type=Path, help="baseline (fine-tuned) REPORT.json")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="gate YAML (default: the shipped gate of --suite, else of the reports' suite name)",
    )
    p.add_argument(
        "--suite", default=None, help="use the gate shipped for this suite name (organism, safety)"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the gate report as JSON")
    p.add_argument(
        "--schema",
        nargs=0,
        action=_PrintSchema,
        help="print the gate config's JSON schema and exit",
    )
    p.set_defaults(func=_gate)


class _PrintSchema(argparse.Action):
    """`--schema`: print GateConfig's JSON schema (for editors and reviews) and exit 0."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        import json

        from evaluation.gates import GateConfig

        print(json.dumps(GateConfig.model_json_schema(), indent=2))
        parser.exit(0)


def _gate(args: argparse.Namespace) -> int:
    from evaluation.gates import GateConfig, GateConfigError, default_gate_config, evaluate_gate
    from evaluation.report import EvalReport, ReportError, write_atomic
    from lssf.cli import fail

    try:
        candidate = EvalReport.load(args.candidate)
        baseline = EvalReport.load(args.baseline)
        if args.config is not None and args.suite is not None:
            raise GateConfigError("pass --config or --suite, not both")
        # Never a path taken from a report: a shipped suite, by name, or the file given here.
        config_path = args.config or default_gate_config(args.suite or candidate.suite)
        config = GateConfig.from_yaml(config_path)
    except (ReportError, GateConfigError) as err:
        return fail("gate", str(err))
    report = evaluate_gate(candidate, baseline, config)
    _print_gate(report)
    if args.out is not None:
        write_atomic(args.out, report.model_dump_json(indent=2) + "\n")
    return 0 if report.passed else 1


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_gate(report: GateReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gate {report.config}: {report.candidate} vs {report.baseline}")
    for col in ("rule", "value", "threshold", "verdict", "reason"):
        table.add_column(col, justify="right" if col in ("value", "threshold") else "left")
    for row in report.rows:
        verdict = "[green]pass[/green]" if row.verdict == "pass" else "[red]FAIL[/red]"
        table.add_row(row.rule, _fmt(row.value), _fmt(row.threshold), verdict, row.reason)
    console = Console(width=160)
    console.print(table)
    console.print("[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]")

"""`lssf evaluate` and `lssf gate`, registered through the `lssf.commands` entry-point group.

Each `register_*` adds one subparser and sets `func=handler(args) -> int` (parse, validate,
call). Exit codes: 0 ok/pass, 1 evaluation error or gate fail, 2 bad input (the message on
stderr through `lssf.cli.fail`, the one convention of every `lssf` command). `lssf` is imported
in the handlers only: importing it costs torch, and gating must stay light.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from evaluation.judges import Judge, JudgeError, get_judge, known_judges
from evaluation.splits import SPLITS
from lssf.bounded import BoundedInputError, loads_yaml

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
    from lssf.cli import fail
    from lssf.errors import LssfError

    try:  # bad input is refused before lm-eval starts: one line, exit 2
        limit = _limit(args.limit)
        _check_inputs(args)
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
    except (LssfError, JudgeError) as err:
        return fail("evaluate", str(err))
    _print_metrics(report)
    return 0 if report.status == "ok" else 1


def _limit(value: float | None) -> int | float | None:
    """``--limit``: a count (>= 1, whole) or a fraction in (0, 1)."""
    from evaluation.suites import EvaluationConfigError

    if value is None:
        return None
    if not math.isfinite(value) or value <= 0 or (value > 1 and not value.is_integer()):
        raise EvaluationConfigError(
            f"--limit {value}: expected a sample count (1, 2, ...) or a fraction in (0, 1)"
        )
    return int(value) if value >= 1 else value


def _check_inputs(args: argparse.Namespace) -> None:
    """The model, suite, data dir, output and answer cap exist and have the right shape."""
    from evaluation.suites import EvaluationConfigError
    from lssf.sources import ModelRef

    ref = ModelRef.parse(args.model)  # CheckpointError: neither a folder nor a Hub id
    if ref.is_local and not Path(ref.repo).is_dir():
        raise EvaluationConfigError(f"--model {args.model}: not a model folder")
    _check_suite(args.suite)
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise EvaluationConfigError(f"--data-dir {args.data_dir}: no such folder")
    if args.out.is_dir():
        raise EvaluationConfigError(f"--out {args.out} is a folder; name the report file")
    if args.max_gen_toks is not None and args.max_gen_toks < 1:
        raise EvaluationConfigError(f"--max-gen-toks {args.max_gen_toks}: must be at least 1")


def _check_suite(spec: str) -> None:
    """A suite YAML (read by the runner), or a name some suite or task YAML mentions.

    lm-eval's own index takes ~25 s to build; a name that no task YAML (lssf's or lm-eval's)
    contains cannot be a task, group or tag, so it is refused here without the index.
    """
    from evaluation.lm_eval_tasks import TASKS_DIR
    from evaluation.suites import SUITES_DIR, EvaluationConfigError, is_suite_name, known_suites

    if Path(spec).suffix in (".yaml", ".yml"):
        return
    unknown = EvaluationConfigError(
        f"--suite {spec[:80]!r}: not a shipped suite ({', '.join(known_suites())}), a suite "
        "YAML, an lssf task or an lm-eval task name"
    )
    if not is_suite_name(spec):
        raise unknown
    if spec in known_suites():
        return
    import lm_eval.tasks

    needle = spec.encode()
    folders = (SUITES_DIR, TASKS_DIR, Path(lm_eval.tasks.__file__).parent)
    if not any(needle in f.read_bytes() for d in folders for f in d.rglob("*.yaml")):
        raise unknown


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
        try:  # bounded and strict, as every YAML lssf reads
            parsed[key] = loads_yaml(value)
        except (BoundedInputError, yaml.YAMLError) as err:
            problem = " ".join(str(err).split())[:200]
            raise JudgeError(f"--judge-option {key[:80]}: not a YAML value ({problem})") from None
    return get_judge(name, **parsed)


def _batch_size(value: str | None) -> int | str | None:
    from evaluation.suites import EvaluationConfigError

    if value is None or value == "auto":
        return value
    if not (value.isascii() and value.isdigit() and len(value) <= 6) or int(value) < 1:
        raise EvaluationConfigError(f"--batch-size {value[:40]!r}: expected a count >= 1 or 'auto'")
    return int(value)


def _print_metrics(report: EvalReport) -> None:
    from rich.console import Console
    from rich.table import Table

    from lssf.report import safe_text as t  # report fields are data, never markup or escapes

    console = Console()
    if report.status != "ok":
        console.print(f"[red]evaluation failed[/red]: {t(report.error, 2000)}")
        return
    title = f"{report.suite} ({report.split}) - {report.model} (judge {report.judge})"
    table = Table(title=t(title, 400))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    for name, value in report.metrics.items():
        table.add_row(t(name), f"{value:.4f}", t(report.n_samples.get(name, "")))
    if not report.metrics:  # one task, no named metrics: lm-eval's own, samples per task
        for name, value in report.raw_metrics.items():
            task = name.split("/", 1)[0]
            table.add_row(t(name), f"{value:.4f}", t(report.raw_n_samples.get(task, "")))
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

    from lssf.report import safe_text as t  # names and reasons come from the reports

    title = f"gate {report.config}: {report.candidate} vs {report.baseline}"
    table = Table(title=t(title, 400))
    for col in ("rule", "value", "threshold", "verdict", "reason"):
        table.add_column(col, justify="right" if col in ("value", "threshold") else "left")
    for row in report.rows:
        verdict = "[green]pass[/green]" if row.verdict == "pass" else "[red]FAIL[/red]"
        table.add_row(
            t(row.rule), _fmt(row.value), _fmt(row.threshold), verdict, t(row.reason, 400)
        )
    console = Console(width=160)
    console.print(table)
    console.print("[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]")

"""Pipeline subcommands for the `lssf` entry point (registered via `lssf.commands`).

- `lssf demo [--workdir DIR]`: the whole pipeline on the model organism, offline.
- `lssf config schema` / `lssf config validate FILE`: the config's JSON schema; check a file.
- `lssf promote --config FILE --family NAME [--version N]`: alias `champion` onto a version.

Each handler parses, validates, calls, and returns an exit code; bad input is one line on
stderr and exit status 2, as in `lssf.cli`. Prefect and MLflow are imported inside handlers so
`lssf --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_DEMO_DIR = Path(".state/demo")
USAGE_ERROR = 2


def _usage_error(command: str, exc: Exception) -> int:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"lssf {command}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _quiet_defaults() -> None:
    """Settings for a Prefect run with no server: slow machines need a longer start-up."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def cmd_demo(args: argparse.Namespace) -> int:
    _quiet_defaults()
    from evaluation.organism import OrganismConfig
    from flows.demo import render, run_demo

    log_file = args.workdir.expanduser().resolve() / "demo.log"
    if not args.verbose:
        _route_library_logs(log_file)
    result = run_demo(
        args.workdir, seed=args.seed, organism_config=OrganismConfig(finetune=args.finetune)
    )
    print(render(result))
    if not args.verbose:
        print(f"Library log (Prefect, MLflow, lm-eval): {log_file}")
    return 0 if result.summary.get("status") in ("passed", "rejected") else 1


def _route_library_logs(log_file: Path) -> None:
    """Send the INFO lines of Prefect, MLflow, lm-eval and transformers to `log_file`; the
    terminal keeps warnings, errors and progress bars. Imports the libraries first, because
    each installs its own console handlers when imported."""
    import logging

    import lm_eval  # noqa: F401
    import mlflow  # noqa: F401
    import prefect  # noqa: F401

    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.setLevel(logging.WARNING)
        if lg is logging.getLogger() or (lg.handlers and not lg.propagate):
            lg.addHandler(to_file)
    logging.getLogger().setLevel(logging.INFO)


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="organism -> watch -> realign -> gate -> MLflow registry, offline"
    )
    p.add_argument(
        "--workdir", type=Path, default=DEFAULT_DEMO_DIR, help=f"default: {DEFAULT_DEMO_DIR}"
    )
    # Default: the shipped LoRA organism of seed 3 (data/organisms/), the same bytes on every
    # machine, where the held-out gate passes (docs/organism_results.md), so the demo walks
    # the whole path to a registered version. `--seed 0 --finetune full` (trained on first use,
    # ~17 CPU-minutes) shows the search finding no passing alpha and the gate rejecting.
    p.add_argument("--seed", type=int, default=3, help="organism seed (default 3, shipped)")
    p.add_argument(
        "--finetune",
        choices=("full", "lora"),
        default="lora",
        help="how the organism's fine-tune is trained (default lora, the paper's r=16)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the library log lines (Prefect, MLflow, lm-eval) instead of writing them "
        "to WORKDIR/demo.log",
    )
    p.set_defaults(func=cmd_demo)


def cmd_config_schema(args: argparse.Namespace) -> int:
    from tasks.config import config_schema

    print(config_schema())
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    from lssf.errors import ConfigError
    from tasks.config import load_config

    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        return _usage_error("config validate", exc)
    names = ", ".join(sorted(cfg.families))
    print(f"{args.file}: valid; families: {names}; tracking URI: {cfg.resolved_tracking_uri()}")
    return 0


def register_config(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("config", help="pipeline config: print its schema, validate a file")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    s = sub.add_parser("schema", help="print the JSON schema of the pipeline config")
    s.set_defaults(func=cmd_config_schema)
    v = sub.add_parser("validate", help="validate a pipeline config YAML")
    v.add_argument("file", type=Path)
    v.set_defaults(func=cmd_config_validate)


def cmd_promote(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from lssf.errors import ConfigError
    from tasks import registry
    from tasks.config import load_config

    try:
        fam = (cfg := load_config(args.config)).family(args.family)
        client = cfg.record_store().client()
        version = registry.promote(client, fam.registered_model, args.version, to_alias=args.alias)
    except (ConfigError, KeyError, ValueError, registry.MlflowException) as exc:
        return _usage_error("promote", exc)
    print(f"{fam.registered_model} version {version.version} is now '{args.alias}'")
    return 0


def register_promote(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("promote", help="point the 'champion' alias at a passing version")
    p.add_argument("--config", type=Path, default=Path("configs/organism.yaml"))
    p.add_argument("--family", default="organism")
    p.add_argument("--version", help="model version (default: the one aliased 'candidate')")
    p.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    p.set_defaults(func=cmd_promote)

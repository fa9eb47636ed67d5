"""`lssf world build --out DIR --data DIR` (entry point: lssf.commands)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from evaluation.realworld.build import STAGES

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `world` command group to the `lssf` CLI."""
    parser = subparsers.add_parser(
        "world", help="the real-weights world (SmolLM2-135M reference/aligned/fine-tuned)"
    )
    commands = parser.add_subparsers(dest="world_command", required=True)
    build = commands.add_parser(
        "build",
        help="convert, distil, align and fine-tune (staged, cached, resumable)",
        description="Builds DIR/reference (SmolLM2-135M-Instruct from its GGUF wheel), "
        "DIR/aligned (our safety SFT), DIR/finetuned_full and DIR/finetuned_lora (a PEFT "
        "adapter): benign fine-tunes with no safety data; and DIR/eval, the `realworld` "
        "suite's data. About an hour on 2 CPU cores; a finished stage is never redone.",
    )
    # Not required by argparse: `--schema` alone prints the schema (checked in _build).
    build.add_argument("--out", type=Path, help="the world's folder (required)")
    build.add_argument(
        "--data", type=Path, help="the benchmark data dir written by `lssf data fetch` (required)"
    )
    build.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    build.add_argument("--cache", type=Path, default=None, help="wheel cache (default ~/.cache)")
    build.add_argument("--wheels", type=Path, default=None, help="read wheels here, never pip")
    build.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        default=None,
        help="train only this stage (repeatable; the others must be built already): e.g. "
        "run `--stage finetuned_full` and `--stage finetuned_lora` in two processes",
    )
    build.add_argument("--schema", action="store_true", help="print the config's JSON schema")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from evaluation.organism.build import check_seed
    from evaluation.realworld import WorldConfig, build_world
    from evaluation.realworld.build import stage_info

    if args.schema:
        print(json.dumps(WorldConfig.model_json_schema(), indent=2))
        return 0
    if args.out is None or args.data is None:
        from lssf.errors import ConfigError

        raise ConfigError("world build needs --out DIR and --data DIR (only --schema runs alone)")
    check_seed(args.seed)
    paths = build_world(
        args.out,
        args.data,
        WorldConfig(seed=args.seed),
        cache=args.cache,
        wheel_dir=args.wheels,
        stages=args.stage or STAGES,
    )
    for folder in (paths.reference, paths.aligned, paths.finetuned_full, paths.finetuned_lora):
        info = stage_info(folder)
        print(f"{folder}  key {info.get('key')}  {info.get('wall_s')} s")
    print(f"eval data: {paths.eval_dir}")
    return 0

"""`lssf organism build --seed N --out DIR [--finetune lora|full]` (entry point: lssf.commands)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `organism` command group to the `lssf` CLI."""
    parser = subparsers.add_parser("organism", help="the tiny model organism (base/aligned/ft)")
    commands = parser.add_subparsers(dest="organism_command", required=True)
    build = commands.add_parser("build", help="train (or reuse) one seed's organism")
    build.add_argument("--seed", type=int, required=True, help="the seed (data, init, batches)")
    build.add_argument("--out", type=Path, required=True, help="output folder")
    build.add_argument(
        "--finetune",
        choices=("lora", "full"),
        default="lora",
        help="fine-tune of the new task: peft LoRA r=16 (merged) or full (default: lora)",
    )
    build.add_argument(
        "--from-scratch",
        action="store_true",
        help="train even when a shipped organism (data/organisms/) has the same key; the "
        "result matches it on the machine that made it, not necessarily on this one (the "
        "weights' sha256 are printed to compare)",
    )
    build.add_argument(
        "--reuse",
        type=Path,
        nargs="*",
        default=[],
        help="built organisms whose stages may be reused when their keys match (e.g. the "
        "LoRA organism of the same seed gives a full one its base and aligned stages)",
    )
    build.add_argument("--schema", action="store_true", help="print the config's JSON schema")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from evaluation.organism import OrganismConfig, build_organism
    from evaluation.organism.build import read_manifest

    if args.schema:
        print(json.dumps(OrganismConfig.model_json_schema(), indent=2))
        return 0
    config = OrganismConfig(finetune=args.finetune)
    paths = build_organism(
        args.seed, args.out, config, reuse=args.reuse, use_shipped=not args.from_scratch
    )
    state = "reused" if paths.cached else "trained"
    print(f"organism seed {args.seed} {state} at {paths.root} (key {paths.cache_key})")
    for stage, hashes in read_manifest(paths.root)["sha256"].items():
        for name, digest in hashes.items():
            print(f"  {stage}/{name}  sha256 {digest}")
    return 0

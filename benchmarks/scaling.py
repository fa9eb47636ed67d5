"""The scaling curve of `lssf fuse` and `lssf extract`: wall time and peak RSS against size (#13).

For each size (default 0.25, 1 and 4 GB of bf16 weights; ``--sizes``) it generates the
Llama-shaped trio (``lssf.synthetic.make_trio``, hidden 1024 at every size, so only the number
of tensors grows: see ``mergekit_compare.shape_for``) and runs, each as a whole process under
the small fork+exec launcher of ``mergekit_compare.measure`` (peak RSS = the command's
``VmHWM``), ``--runs`` alternating rounds (median wall and CPU, max RSS):

- ``lssf extract --aligned A --reference R --out P`` (default entropy rule, eta 0.85);
- ``lssf fuse --finetuned F --patch P --out O`` with a fixed-rank patch: per layer the ranks a
  real extraction chose on the 0.25 GB trio (``fuse_speed.RANKS``, random orthonormal ``U``),
  so every size does the same work per layer and fuse needs no extraction first.

``--ops fuse`` or ``--ops extract`` runs one of them (the 4 GB extract takes long on 2 cores).
The table ends with the peak-RSS ratios 1GB / 0.25GB (target <= 1.2x: memory stays flat) and
largest / smallest.

Run (tiny check): ``.venv/bin/python benchmarks/scaling.py --sizes 0.05 0.1``.
Full: ``.venv/bin/python benchmarks/scaling.py --workdir DIR`` (add ``--ops fuse`` to skip the
long extractions).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mergekit_compare import make_models, measure, parse_size, shape_for

OPS = ("fuse", "extract")


def fixed_rank_patch(models: dict[str, Path], gb: float, patch: Path) -> Path:
    """``fuse_speed.write_patch``'s patch for the fine-tune, recorded as built from ``aligned``
    (the base the fine-tune's card declares, so fuse's lineage check passes)."""
    from fuse_speed import write_patch

    if not (patch / "manifest.json").exists():
        shutil.rmtree(patch, ignore_errors=True)
        write_patch(patch, models["aligned"], shape_for(gb))
    return patch


def command(op: str, models: dict[str, Path], patch: Path, out: Path) -> list[str]:
    lssf = str(Path(sys.executable).with_name("lssf"))
    if op == "extract":
        return [lssf, "extract", "--aligned", str(models["aligned"]), "--reference",
                str(models["reference"]), "--out", str(out)]  # fmt: skip
    return [lssf, "fuse", "--finetuned", str(models["finetuned"]), "--patch", str(patch),
            "--out", str(out)]  # fmt: skip


def run_all(work: Path, sizes: list[float], ops: list[str], runs: int) -> dict:
    """(op, size) -> median wall/CPU and max peak RSS over ``runs`` alternating rounds."""
    setup = {}
    for gb in sizes:
        models = make_models(work / f"models-{gb:g}GB", gb)
        patch = fixed_rank_patch(models, gb, work / f"patch-{gb:g}GB") if "fuse" in ops else None
        setup[gb] = (models, patch)
    env = os.environ | {"PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    got: dict[tuple[str, float], list[dict]] = {}
    for i in range(runs):
        for gb in sizes:
            for op in ops:
                out = work / f"out-{op}"
                shutil.rmtree(out, ignore_errors=True)  # fresh files every run, untimed
                time.sleep(0.5)
                cmd = command(op, *setup[gb], out)
                r = measure(cmd, env, work / f"log-{op}-{gb:g}-{i}.txt")
                got.setdefault((op, gb), []).append(r)
                print(f"run {i + 1}/{runs} {op} {gb:g}GB: {r['wall_s']:.2f} s", file=sys.stderr)
    checkpoint_gb = {
        gb: sum(f.stat().st_size for f in m["finetuned"].glob("*.safetensors")) / 1e9
        for gb, (m, _) in setup.items()
    }
    return {
        key: {
            "gb": checkpoint_gb[key[1]],
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }
        for key, rs in got.items()
    }


def print_table(res: dict, sizes: list[float], ops: list[str], runs: int) -> None:
    import torch

    print(f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}; {time.strftime('%Y-%m-%d %H:%M %Z')}."
          f" Whole processes, median of {runs} alternating runs; LSSF_HASH_CACHE="
          f"{os.environ.get('LSSF_HASH_CACHE', 'unset')}.\n")  # fmt: skip
    print("| command | size | checkpoint GB | wall s | CPU s | s per GB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for op in ops:
        for gb in sizes:
            r = res[(op, gb)]
            per_gb = r["wall_s"] / r["gb"]
            print(f"| lssf {op} | {gb:g}GB | {r['gb']:.3f} | {r['wall_s']:.2f} | "
                  f"{r['cpu_s']:.2f} | {per_gb:.2f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    print()
    pairs = [(1.0, 0.25), (max(sizes), min(sizes))]
    for op in ops:
        for big, small in dict.fromkeys(p for p in pairs if p[0] in sizes and p[1] in sizes):
            if big == small:
                continue
            ratio = res[(op, big)]["peak_rss_mb"] / res[(op, small)]["peak_rss_mb"]
            print(f"- lssf {op}: peak RSS {big:g}GB / {small:g}GB = {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[0.25, 1.0, 4.0],
                        help="checkpoint sizes in GB (default 0.25 1 4)")  # fmt: skip
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--runs", type=int, default=1, help="alternating rounds (1)")
    parser.add_argument("--workdir", type=Path, help="keep the generated models here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    sizes = sorted(dict.fromkeys(args.sizes))
    ops = list(dict.fromkeys(args.ops))
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="lssf-scaling-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    res = run_all(work, sizes, ops, args.runs)
    print_table(res, sizes, ops, args.runs)
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

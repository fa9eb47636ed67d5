"""Memory and speed of `extract` and `fuse` on generated Llama-shaped checkpoints.

Prints one table. For two model sizes (about 0.25 GB and 1 GB in bf16) it measures, each in a
fresh subprocess so peak RSS (ru_maxrss) is the operation's own:

- extract: aligned/reference -> safety patch (streaming, one tensor at a time)
- fuse: fine-tuned + patch -> model folder (streaming)
- I/O floor: a plain safetensors read + write copy of the fine-tuned checkpoint
  (``safetensors.torch.load_file`` + ``save_file`` per shard)
- whole load: the three checkpoints loaded whole with ``load_file`` and materialised (safetensors
  maps files lazily, so untouched pages would not count), what a non-streaming implementation
  holds at once

Run: ``.venv/bin/python benchmarks/streaming.py [--workdir DIR] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lssf import PatchConfig, SafetyPatch, extract
from lssf.synthetic import LlamaShape, make_trio

SIZES = {
    "0.25GB": LlamaShape(
        hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16, vocab=16000
    ),
    "1GB": LlamaShape(
        hidden=1024, intermediate=2816, layers=34, heads=16, kv_heads=16, vocab=32000
    ),
}

PRELUDE = """
import json, sys, time
import torch
torch.set_num_threads({threads})
t0 = time.perf_counter()
"""
EPILOGUE = """
wall = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the parent process.
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"wall_s": wall, "peak_rss_mb": rss}))
"""
OPS = {
    "import torch only": "",
    "extract": (
        "from lssf import extract\n"
        "extract('{d}/aligned', '{d}/reference', '{d}/patch', overwrite=True, progress=False)"
    ),
    "fuse": (
        "from lssf import fuse\n"
        "fuse('{d}/finetuned', '{d}/patch', '{d}/fused', overwrite=True, progress=False)"
    ),
    "fuse, rank-256 patch": (
        "from lssf import fuse\n"
        "fuse('{d}/finetuned', '{d}/patch256', '{d}/fused', overwrite=True, progress=False)"
    ),
    "I/O floor (load_file+save_file)": (
        "from pathlib import Path\n"
        "from safetensors.torch import load_file, save_file\n"
        "out = Path('{d}/copy'); out.mkdir(exist_ok=True)\n"
        "for f in sorted(Path('{d}/finetuned').glob('*.safetensors')):\n"
        "    save_file(load_file(f), out / f.name, metadata={{'format': 'pt'}})"
    ),
    "whole load of the 3 models": (
        "from pathlib import Path\n"
        "from safetensors.torch import load_file\n"
        "held = [{{k: v.clone() for k, v in load_file(f).items()}}\n"
        "        for r in ('aligned', 'reference', 'finetuned')\n"
        "        for f in sorted(Path('{d}', r).glob('*.safetensors'))]"
    ),
}


def run_op(code: str, folder: Path, threads: int) -> dict:
    src = PRELUDE.format(threads=threads) + code.format(d=folder) + EPILOGUE
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def high_rank_patch(folder: Path) -> None:
    """The same patch forced to rank 256 everywhere, to show the compute-bound end of fuse."""
    extract(
        folder / "aligned",
        folder / "reference",
        folder / "patch256",
        PatchConfig(rank_rule="full", max_rank=256),
        overwrite=True,
        progress=False,
    )


def bench_size(name: str, shape: LlamaShape, root: Path, repeats: int, threads: int) -> list:
    folder = root / name
    make_trio(folder, shape, dtype=torch.bfloat16, shard_bytes=500_000_000)
    rows = []
    for op, code in OPS.items():
        if op == "fuse, rank-256 patch":
            high_rank_patch(folder)
        runs = [run_op(code, folder, threads) for _ in range(1 if op == "extract" else repeats)]
        best = min(runs, key=lambda r: r["wall_s"])
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        rows.append((name, folder_gb(folder / "finetuned"), op, best))
    ranks = [t.rank for t in SafetyPatch.load(folder / "patch").manifest.tensors.values()]
    print(f"{name}: eta 0.85 ranks {min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})")
    shutil.rmtree(folder)
    return rows


def print_table(rows: list, sizes: list[str]) -> None:
    print("| size | checkpoint GB | operation | wall s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for size, gb, op, r in rows:
        print(f"| {size} | {gb:.3f} | {op} | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    by = {(s, op): r for s, _, op, r in rows}
    print()
    for size in sizes:
        fuse, floor = by[(size, "fuse")], by[(size, "I/O floor (load_file+save_file)")]
        hi = by[(size, "fuse, rank-256 patch")]
        whole = by[(size, "whole load of the 3 models")]
        print(
            f"{size}: fuse / I/O floor = {fuse['wall_s'] / floor['wall_s']:.2f}x "
            f"(rank-256 patch: {hi['wall_s'] / floor['wall_s']:.2f}x); "
            f"fuse RSS / whole load RSS = {fuse['peak_rss_mb'] / whole['peak_rss_mb']:.2f}; "
            f"extract RSS / whole load RSS = "
            f"{by[(size, 'extract')]['peak_rss_mb'] / whole['peak_rss_mb']:.2f}"
        )
    if len(sizes) < 2:
        return
    small, large = sizes[0], sizes[-1]
    for op in ("extract", "fuse"):
        ratio = by[(large, op)]["peak_rss_mb"] / by[(small, op)]["peak_rss_mb"]
        print(f"{op}: peak RSS {large} / {small} = {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lssf-bench-"))
    # Input digests cached in the run's own folder (lssf.hashcache), never the user's cache:
    # a fuse after the first of the same inputs does not hash them again.
    os.environ.setdefault("LSSF_CACHE_DIR", str(root / "hash-cache"))
    rows = []
    for name in args.sizes:
        rows += bench_size(name, SIZES[name], root, args.repeats, args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, LSSF_HASH_CACHE="
          f"{os.environ.get('LSSF_HASH_CACHE', 'unset')} (LSSF_CACHE_DIR "
          f"{os.environ['LSSF_CACHE_DIR']})\n")  # fmt: skip
    print_table(rows, args.sizes)


if __name__ == "__main__":
    main()

"""Extraction speed: the certified low-rank path against the full SVD, per matrix and whole.

Table 1, per shape (deltas built like ``lssf.synthetic``: decaying low-rank signal + noise,
through bf16 rounding): today's full SVD (``safety_spectrum``) vs ``lowrank.top_subspace``,
ranks equal, relative error of ``U_r U_r^T delta`` against the full-SVD path, fallback used.
Table 2: ``lssf extract`` on a generated 0.25 GB bf16 trio vs a naive script (load whole,
``torch.linalg.svd`` per matrix, same entropy rank), each in a fresh subprocess, alternating.

One torch thread everywhere (``--threads``). Run:
``.venv/bin/python benchmarks/extract_speed.py [--big] [--repeats 3] [--skip-trio]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lssf.lowrank import top_subspace
from lssf.spectral import entropy_rank, safety_spectrum
from lssf.synthetic import LlamaShape, low_rank, make_trio

SHAPES = [(1024, 2816), (2816, 1024), (2048, 2048)]
BIG = [(4096, 4096), (11008, 4096), (4096, 11008)]
TRIO = LlamaShape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16, vocab=16000)

NAIVE = """
import json, sys, time, torch
torch.set_num_threads({threads})
t0 = time.perf_counter()
from safetensors.torch import load_file, save_file
from pathlib import Path
from lssf.config import PatchConfig
from lssf.spectral import entropy_rank, safety_spectrum
cfg = PatchConfig()
load = lambda r: {{k: v for f in sorted(Path('{d}', r).glob('*.safetensors'))
                  for k, v in load_file(f).items()}}
a, r = load('aligned'), load('reference')
out = {{}}
for name in a:
    if not cfg.is_target(name, a[name].ndim):
        continue
    delta = a[name].float() - r[name].float()
    spec = safety_spectrum(delta)  # torch.linalg.svd of the tall form
    k = entropy_rank(spec.s, cfg.eta)
    out[name + '.U'] = spec.u[:, :k].contiguous()
    out[name + '.C'] = (spec.u[:, :k].T @ delta).contiguous()
save_file(out, '{d}/naive.safetensors')
print(json.dumps({{"wall_s": time.perf_counter() - t0}}))
"""
LSSF = """
import json, time, torch
torch.set_num_threads({threads})
t0 = time.perf_counter()
from lssf import extract
extract('{d}/aligned', '{d}/reference', '{d}/patch', overwrite=True, progress=False)
print(json.dumps({{"wall_s": time.perf_counter() - t0}}))
"""


def synthetic_delta(shape: tuple[int, int], seed: int, noise: float = 1e-3) -> torch.Tensor:
    """Signal ``0.5 * q^i`` (i < 8) + isotropic noise at ``noise * s_1``, through bf16."""
    g = torch.Generator().manual_seed(seed)
    decay = 0.35 + 0.55 * float(torch.rand((), generator=g))
    spectrum = [0.5 * decay**i for i in range(8)]
    signal = low_rank(shape, spectrum, g)
    signal += noise * spectrum[0] / max(shape) ** 0.5 * torch.randn(shape, generator=g)
    base = 0.02 * torch.randn(shape, generator=g)
    return (base + signal).bfloat16().float() - base.bfloat16().float()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matrix_row(shape: tuple[int, int], repeats: int, select) -> str:
    delta = synthetic_delta(shape, seed=sum(shape))
    full_t = median_time(lambda: safety_spectrum(delta), repeats)
    fast_t = median_time(lambda: top_subspace(delta, select), repeats)
    spec, found = safety_spectrum(delta), top_subspace(delta, select)
    rank = select(spec.s)
    u_ref, u_new = spec.u[:, :rank].double(), found.spectrum.u.double()
    ref = u_ref @ (u_ref.T @ delta.double())
    err = torch.linalg.norm(u_new @ (u_new.T @ delta.double()) - ref) / torch.linalg.norm(ref)
    return (
        f"| {shape[0]}x{shape[1]} | {full_t:.3f} | {fast_t:.3f} | {fast_t / full_t:.2f}x | "
        f"{'yes' if found.rank == rank else 'NO'} ({rank}) | {float(err):.1e} | "
        f"{found.fallback or 'no'} |"
    )


def run_script(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["wall_s"]


def trio_table(repeats: int, threads: int) -> None:
    with tempfile.TemporaryDirectory(prefix="lssf-extract-bench-") as tmp:
        make_trio(Path(tmp), TRIO, seed=0, dtype=torch.bfloat16)
        scripts = {"naive (load whole, full SVD)": NAIVE, "lssf extract": LSSF}
        times: dict[str, list[float]] = {k: [] for k in scripts}
        for _ in range(repeats):
            for name, code in scripts.items():
                times[name].append(run_script(code.format(d=tmp, threads=threads)))
        naive = statistics.median(times["naive (load whole, full SVD)"])
        print(f"\n| 0.25 GB bf16 trio, {threads} thread(s) | median of {repeats} (s) | ratio |")
        print("|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {med:.2f} | {med / naive:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="add the 7B shapes (minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-trio", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    select = lambda s: entropy_rank(s, 0.85)  # noqa: E731
    print(f"torch threads: {args.threads}; median of {args.repeats}")
    print("| shape | full SVD (s) | new path (s) | ratio | ranks equal (r) | "
          "proj. update rel. err | fallback |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES + (BIG if args.big else []):
        print(matrix_row(shape, args.repeats, select), flush=True)
    if not args.skip_trio:
        trio_table(args.repeats, args.threads)


if __name__ == "__main__":
    main()

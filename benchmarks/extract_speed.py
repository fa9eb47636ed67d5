"""Extraction speed (issue #13): `lssf extract` against the naive full-SVD script, whole processes.

Contenders, each a fresh process under the fork+exec launcher of ``mergekit_compare.measure``
(wall, CPU and peak RSS of the command itself), alternating over ``--repeats`` rounds:

- naive script: load both models whole, ``torch.linalg.svd`` of each target (tall form, as
  ``lssf.spectral.safety_spectrum``), same entropy rank (eta 0.85), save ``U_r`` and
  ``U_r^T delta``; at one torch thread, and at torch's default thread count (all cores);
- ``lssf extract --aligned A --reference R --out P`` with one worker on one thread
  (``LSSF_EXTRACT_WORKERS=1 OMP_NUM_THREADS=1``), and with the defaults (one worker per core).

"Default" runs get the environment without ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, so the
comparison is fair either way. Afterwards each lssf patch is checked against the naive factors:
ranks equal for every tensor, and the largest relative error of the projected update
``||U'C - U_r U_r^T delta||_F / ||U_r U_r^T delta||_F`` (the criterion is 1e-5); where that
exceeds 1e-5, both sides against a float64 SVD (float32 SVD is itself ~1e-4 off at near-ties).

Sizes: ``0.25GB`` and ``1GB`` (the bf16 Llama-shaped trio of ``mergekit_compare.shape_for``,
hidden 1024), ``7B-layer`` (one decoder layer of hidden 4096 / intermediate 11008: q/k/v/o
4096x4096, gate/up 11008x4096, down 4096x11008), and for a functional check ``tiny`` (one
layer of hidden 1024) and ``tiny-layer`` (one layer of hidden 512).

``--matrices`` adds the in-process per-shape table (full SVD vs ``lowrank.top_subspace``, one
thread). ``--threads-check`` times two ``svdvals`` in two threads against one, in one process,
to show whether LAPACK calls from two Python threads run in parallel on this machine.

Tiny check: ``.venv/bin/python benchmarks/extract_speed.py --sizes tiny-layer --repeats 1``.
Full (quiet machine; models kept in DIR, ~6 GB): ``.venv/bin/python benchmarks/extract_speed.py
--sizes 0.25GB,1GB,7B-layer --repeats 3 --workdir DIR --threads-check``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent))
from mergekit_compare import measure, shape_for

from lssf.synthetic import LlamaShape, low_rank, make_trio

SHAPES = [(1024, 2816), (2816, 1024), (1024, 1024)]
BIG = [(4096, 4096), (11008, 4096), (4096, 11008)]
LAYERS = {
    "7B-layer": LlamaShape(hidden=4096, intermediate=11008, layers=1, heads=32, kv_heads=32,
                           vocab=1024),
    "tiny-layer": LlamaShape(hidden=512, intermediate=1376, layers=1, heads=8, kv_heads=8,
                             vocab=1024),
}  # fmt: skip
SIZES = {"0.25GB": 0.25, "1GB": 1.0, "tiny": 0.02}
CRITERION = 1e-5  # projected update, relative (issue #13)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LSSF_EXTRACT_WORKERS")

NAIVE = """
import sys, torch
aligned, reference, out, threads = sys.argv[1:5]
if threads != "default":
    torch.set_num_threads(int(threads))
from pathlib import Path
from safetensors.torch import load_file, save_file
from lssf.config import PatchConfig
from lssf.spectral import entropy_rank, safety_spectrum
cfg = PatchConfig()
load = lambda d: {k: v for f in sorted(Path(d).glob('*.safetensors'))
                  for k, v in load_file(f).items()}
a, r = load(aligned), load(reference)
factors = {}
for name in a:
    if not cfg.is_target(name, a[name].ndim):
        continue
    delta = a[name].float() - r[name].float()
    spec = safety_spectrum(delta)  # torch.linalg.svd of the tall form
    k = entropy_rank(spec.s, cfg.eta)
    factors[name + '.U'] = spec.u[:, :k].contiguous()
    factors[name + '.C'] = (spec.u[:, :k].T @ delta).contiguous()
save_file(factors, out)
"""


def make_models(folder: Path, size: str) -> dict[str, Path]:
    """The generated trio for ``size`` under ``folder``, reused when complete."""
    roles = {k: folder / k for k in ("reference", "aligned", "finetuned")}
    if (folder / "done").exists():
        return roles
    shutil.rmtree(folder, ignore_errors=True)
    shape = LAYERS[size] if size in LAYERS else shape_for(SIZES[size])
    make_trio(folder, shape, dtype=torch.bfloat16, shard_bytes=500_000_000)
    (folder / "done").write_text(json.dumps({"size": size}))
    return roles


def environments() -> dict[str, dict[str, str]]:
    """One-thread and default-thread environments for the child processes."""
    base = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    base |= {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    one = base | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LSSF_EXTRACT_WORKERS": "1"}
    return {"one": one, "default": base}


def contenders(models: dict[str, Path], work: Path) -> dict[str, tuple[list[str], str, Path]]:
    """Name -> (command, environment, output) of every run."""
    lssf = str(Path(sys.executable).with_name("lssf"))
    a, r = str(models["aligned"]), str(models["reference"])

    def naive(threads: str) -> list[str]:
        return [sys.executable, "-c", NAIVE, a, r, str(work / f"naive-{threads}.st"), threads]

    def ours(tag: str) -> list[str]:
        return [lssf, "extract", "--aligned", a, "--reference", r, "--out", str(work / tag)]

    return {
        "naive, 1 thread": (naive("1"), "one", work / "naive-1.st"),
        "naive, default threads": (naive("default"), "default", work / "naive-default.st"),
        "lssf extract, 1 worker x 1 thread": (ours("lssf-1"), "one", work / "lssf-1"),
        "lssf extract, defaults": (ours("lssf-default"), "default", work / "lssf-default"),
    }


def compare(patch: Path, naive: Path, models: dict[str, Path]) -> tuple[bool, float, str, int]:
    """Ranks equal for every tensor, the largest projected-update error against the naive
    factors, where that exceeds ``CRITERION`` both errors against a float64 SVD, tensor count.

    float32 SVD is itself off by ~eps32 s_1 / gap: at near-ties (``s_r / s_{r+1}`` of 1.0004)
    the naive script's projection is up to ~1e-4 from the exact one, so a difference above the
    criterion is traced to whichever side is off.
    """
    from safetensors import safe_open

    from lssf import SafetyPatch
    from lssf.checkpoint import Checkpoint
    from lssf.lowrank import safety_delta
    from lssf.patch import factor_names

    sp = SafetyPatch.load(patch)
    if sp.manifest.config.weight_top != 1.0:
        raise ValueError("compare() needs weight_top 1 (U'C is then the projected update)")
    same, worst, traced = True, 0.0, []
    with (
        safe_open(patch / "factors.safetensors", "pt") as ours,
        safe_open(naive, "pt") as ref,
        Checkpoint(models["aligned"]) as a_ckpt,
        Checkpoint(models["reference"]) as r_ckpt,
    ):
        for name, rec in sp.manifest.tensors.items():
            u_ref, c_ref = ref.get_tensor(name + ".U"), ref.get_tensor(name + ".C")
            same &= rec.rank == u_ref.shape[1]
            if rec.rank == 0 or u_ref.shape[1] != rec.rank:
                continue
            u_name, c_name = factor_names(name)
            mine = ours.get_tensor(u_name).double() @ ours.get_tensor(c_name).double()
            want = u_ref.double() @ c_ref.double()
            err = float(torch.linalg.norm(mine - want) / torch.linalg.norm(want))
            worst = max(worst, err)
            if err > CRITERION:
                delta = safety_delta(name, a_ckpt.get(name), r_ckpt.get(name)).double()
                tall = delta.shape[0] >= delta.shape[1]
                svd = torch.linalg.svd(delta if tall else delta.T, full_matrices=False)
                u = (svd[0] if tall else svd[2].T)[:, : rec.rank]
                exact = u @ (u.T @ delta)
                norm = torch.linalg.norm(exact)
                traced.append((float(torch.linalg.norm(mine - exact) / norm),
                               float(torch.linalg.norm(want - exact) / norm)))  # fmt: skip
    note = "none over 1e-5"
    if traced:
        ours_worst, naive_worst = (max(t[k] for t in traced) for k in (0, 1))
        note = (f"{len(traced)} over 1e-5; vs float64 SVD: lssf <= {ours_worst:.1e}, "
                f"naive <= {naive_worst:.1e}")  # fmt: skip
    return same, worst, note, len(sp.manifest.tensors)


def size_table(size: str, root: Path, repeats: int, reuse_naive: bool = False) -> None:
    models = make_models(root / size, size)
    work = root / f"runs-{size}"
    work.mkdir(exist_ok=True)
    envs, plan = environments(), contenders(models, work)
    got: dict[str, list[dict]] = {name: [] for name in plan}
    for _ in range(repeats):
        for name, (cmd, env, out) in plan.items():
            log = work / f"{out.name}.log"
            if reuse_naive and name.startswith("naive") and out.exists():
                got[name] = [json.loads(log.with_suffix(".json").read_text())]
                continue
            if out.is_dir():
                shutil.rmtree(out)
            out.unlink(missing_ok=True)
            got[name].append(measure(cmd, envs[env], log))
    walls = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in got.items()}
    base1, base_d = walls["naive, 1 thread"], walls["naive, default threads"]
    gb = sum(f.stat().st_size for f in models["aligned"].glob("*.safetensors")) / 1e9
    print(f"\n### {size} ({gb:.3f} GB per model), median of {repeats}, whole processes\n")
    if reuse_naive:
        print("(naive rows: measured in an earlier run of this workdir, `--reuse-naive`)\n")
    print("| run | wall s | CPU s | peak RSS MB | vs naive 1 thread | vs naive default "
          "| ranks equal | max proj. update rel. err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in got.items():
        _, env, out = plan[name]
        check = "| | |"
        if out.is_dir():
            naive = work / f"naive-{'1' if env == 'one' else 'default'}.st"
            same, err, note, n = compare(out, naive, models)
            check = f"| {'yes' if same else 'NO'} ({n} tensors) | {err:.1e} ({note}) |"
        cpu = statistics.median(r["cpu_s"] for r in rs)
        rss = max(r["peak_rss_mb"] for r in rs)
        w = walls[name]
        print(f"| {name} | {w:.2f} | {cpu:.2f} | {rss:.0f} | {w / base1:.2f}x | "
              f"{w / base_d:.2f}x {check}", flush=True)  # fmt: skip


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
    from lssf.lowrank import top_subspace
    from lssf.spectral import safety_spectrum

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


def matrices_table(repeats: int, big: bool) -> None:
    from lssf.spectral import entropy_rank

    torch.set_num_threads(1)
    threadpool_limits(limits=1)  # numpy's BLAS (the Gram route) on one thread too
    select = lambda s: entropy_rank(s, 0.85)  # noqa: E731
    print(f"\n### Per matrix, in process, one thread, median of {repeats}\n")
    print("| shape | full SVD (s) | lssf path (s) | ratio | ranks equal (r) | "
          "proj. update rel. err | fallback |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES + (BIG if big else []):
        print(matrix_row(shape, repeats, select), flush=True)


def _loop_rate(stop, seconds: float | None) -> float:
    """Iterations per second of a bare Python loop until ``stop()`` or ``seconds``."""
    t0, n = time.perf_counter(), 0
    while not stop() and (seconds is None or time.perf_counter() - t0 < seconds):
        n += 1
    return n / max(time.perf_counter() - t0, 1e-9)


def threads_check() -> None:
    """Two ``svdvals`` in two Python threads vs one after the other, one intra-op thread each."""
    torch.set_num_threads(1)
    d = synthetic_delta((2816, 1024), seed=0)

    def work() -> None:
        torch.set_num_threads(1)
        torch.linalg.svdvals(d)

    work()  # warm-up
    serial = median_time(lambda: (work(), work()), 3)

    def two() -> None:
        ts = [threading.Thread(target=work) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    parallel = median_time(two, 3)
    # Does svdvals hold the GIL? A Python loop in this thread keeps its pace only if not.
    done = threading.Event()
    solo = _loop_rate(lambda: None, 0.3)
    worker = threading.Thread(target=lambda: (work(), done.set()))
    worker.start()
    during = _loop_rate(done.is_set, None)
    worker.join()
    print(
        f"\nGIL: a Python loop ran at {during / solo:.0%} of its solo pace during svdvals "
        "in another thread (near 0% = GIL held)"
    )
    print(f"\nthreads check: two svdvals(2816x1024) one after the other {serial:.3f} s, "
          f"in two threads {parallel:.3f} s ({serial / parallel:.2f}x; 2x = fully parallel), "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.25GB,1GB,7B-layer",
                        help=f"comma-separated, of {[*SIZES, *LAYERS]}")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep generated models here (reused)")
    parser.add_argument("--matrices", action="store_true", help="add the per-shape table")
    parser.add_argument("--big", action="store_true", help="per-shape table: add 7B shapes")
    parser.add_argument("--threads-check", action="store_true")
    parser.add_argument("--reuse-naive", action="store_true",
                        help="naive rows from an earlier run in --workdir (they do not depend "
                             "on lssf's code; the table says so)")  # fmt: skip
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES and s not in LAYERS]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; known: {[*SIZES, *LAYERS]}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip
    if args.threads_check:
        threads_check()
    if args.matrices:
        matrices_table(args.repeats, args.big)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            size_table(size, args.workdir, args.repeats, args.reuse_naive)
        return
    with tempfile.TemporaryDirectory(prefix="lssf-extract-bench-") as tmp:
        for size in sizes:
            size_table(size, Path(tmp), args.repeats)


if __name__ == "__main__":
    main()

"""`lssf fuse` beside mergekit's task_arithmetic and the I/O floors, as whole processes (issue #13).

One command, one Markdown table. It

1. creates (or reuses) a throwaway venv with ``mergekit==0.1.5`` and the CPU ``torch==2.13.0``
   (``--venv``, default ``~/.cache/lssf/mergekit-venv``; mergekit is not a project dependency);
2. generates the bf16 Llama-shaped trio (``lssf.synthetic.make_trio``, hidden 1024,
   intermediate 2816, ~500 MB shards; layers and vocabulary sized to ``--size``);
3. extracts a FULL-RANK patch (``rank_rule="full"``), so ``lssf fuse`` computes
   ``W_ft + alpha (W_aligned - W_ref)`` on every target, the same arithmetic as task arithmetic;
4. times, alternating, ``--runs`` times, each a fresh process (median wall and CPU, max peak
   RSS): ``lssf fuse``; ``mergekit-yaml`` task_arithmetic on the same three models (base: the
   reference; fine-tune weight 1; aligned weight ``alpha`` except on embeddings and the head,
   which lssf leaves alone; float32 arithmetic, bf16 output); the I/O floor (``load_file`` +
   ``save_file`` of an identical copy); the floor that also casts every 2-D weight to float32
   and back;
5. compares the outputs: max abs difference of lssf against mergekit, and of each against the
   exact result ``bf16(W_ft + alpha (W_aligned - W_ref))`` computed in float64, in absolute
   terms and in bf16 ulps.

Peak RSS: each command runs under a tiny launcher (``python -I -S``, ~10 MB) that forks, execs
it and reads ``ru_maxrss`` from ``wait4``: the high-water mark of the exec'd image (``VmHWM``),
which Linux carries over exec from the parent, so the launcher must be small (this script is
not: it imports torch). The floors also print their own ``VmHWM`` as a check.

Run (tiny check): ``.venv/bin/python benchmarks/mergekit_compare.py --size 0.05GB --runs 1``.
Full: ``.venv/bin/python benchmarks/mergekit_compare.py --size 1GB --runs 5 --workdir DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"  # the local CPU wheel; an unpinned torch would pull CUDA
DEFAULT_VENV = Path.home() / ".cache" / "lssf" / "mergekit-venv"
HIDDEN, INTERMEDIATE = 1024, 2816
# Names lssf never targets by default (lssf.config.DEFAULT_EXCLUDE); mergekit gets weight 0 there.
UNPATCHED = ("embed_tokens", "lm_head")

LAUNCHER = r"""
import json, os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall,
               "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024}, fh)
"""
FLOOR = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, out, cast = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "cast"
out.mkdir()
for f in sorted(src.glob("*.safetensors")):
    t = load_file(f)
    if cast:
        t = {k: v.float().to(v.dtype) if v.dim() == 2 else v for k, v in t.items()}
    save_file(t, out / f.name, metadata={"format": "pt"})
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
(out / "vmhwm_kb").write_text(str(hwm))
"""


def parse_size(text: str) -> float:
    """``"0.05GB"``, ``"1gb"`` or ``"4"``: gigabytes (1e9 bytes) of the bf16 checkpoint."""
    try:
        gb = float(text.strip().lower().removesuffix("gb"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 0.25GB or 1") from None
    if not 0 < gb <= 64:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected between 0 and 64 GB")
    return gb


def shape_for(gb: float):
    """A Llama shape of about ``gb`` in bf16: hidden 1024 always, so tensors are the same size
    at every model size and only their number grows (0.25 GB: 8 layers, 1 GB: 34, as in
    ``fuse_speed.py``)."""
    from lssf.synthetic import LlamaShape

    vocab = 32000 if gb >= 0.5 else 16000 if gb >= 0.2 else 4000
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE)
    layers = max(1, math.ceil((gb * 1e9 - 2 * 2 * vocab * HIDDEN) / per_layer))
    return LlamaShape(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=layers, heads=16,
                      kv_heads=16, vocab=vocab)  # fmt: skip


def make_models(folder: Path, gb: float) -> dict[str, Path]:
    """The trio under ``folder`` (reused if complete: a ``done`` marker is written last)."""
    import torch

    from lssf.synthetic import make_trio

    roles = {k: folder / k for k in ("reference", "aligned", "finetuned")}
    if (folder / "done").exists():
        return roles
    shutil.rmtree(folder, ignore_errors=True)
    make_trio(folder, shape_for(gb), dtype=torch.bfloat16, shard_bytes=500_000_000)
    (folder / "done").write_text(json.dumps({"gb": gb}))
    return roles


def full_rank_patch(models: dict[str, Path], patch: Path) -> Path:
    """Every direction of ``aligned - reference`` kept: fuse then adds exactly that delta."""
    from lssf import PatchConfig, extract

    if not (patch / "manifest.json").exists():
        extract(models["aligned"], models["reference"], patch, PatchConfig(rank_rule="full"),
                overwrite=True, progress=False)  # fmt: skip
    return patch


def ensure_mergekit(venv: Path) -> Path:
    """``mergekit-yaml`` from ``venv``, created with pinned mergekit and CPU torch if missing."""
    exe, ready = venv / "bin" / "mergekit-yaml", venv / ".lssf-ready"
    if ready.exists() and exe.exists():
        return exe
    shutil.rmtree(venv, ignore_errors=True)  # a half-made venv from an interrupted run
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"creating {venv} ({MERGEKIT}, {TORCH}; a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)  # first, so mergekit's torch requirement is met
    subprocess.run([*pip, MERGEKIT, TORCH], check=True)
    if not exe.exists():
        raise RuntimeError(f"{venv}: {MERGEKIT} installed no mergekit-yaml")
    ready.write_text(f"{MERGEKIT}\n{TORCH}\n")
    return exe


def mergekit_config(models: dict[str, Path], alpha: float) -> str:
    """task_arithmetic: ref + 1 (ft - ref) + alpha (aligned - ref), in float32, bf16 out."""
    weight = [{"filter": name, "value": 0.0} for name in UNPATCHED] + [{"value": alpha}]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["reference"]),
        "models": [
            {"model": str(models["finetuned"]), "parameters": {"weight": 1.0}},
            {"model": str(models["aligned"]), "parameters": {"weight": weight}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    return json.dumps(config, indent=2)  # JSON is YAML


def measure(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Wall, CPU and peak RSS of ``cmd`` as a whole process; its output goes to ``log``."""
    result = log.with_suffix(".json")
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(result), *cmd]
    with log.open("w") as out:
        subprocess.run(launcher, stdout=out, stderr=subprocess.STDOUT, env=env, check=True)
    r = json.loads(result.read_text())
    if r["rc"] != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{cmd[0]} exited with {r['rc']}; log {log}:\n{tail}")
    return r


def commands(work: Path, models: dict[str, Path], patch: Path, mergekit: Path, alpha: float):
    """Each contender's command line and the folder it writes."""
    lssf = Path(sys.executable).with_name("lssf")
    config = work / "mergekit.yml"
    config.write_text(mergekit_config(models, alpha))
    ft = str(models["finetuned"])
    floor = [sys.executable, "-c", FLOOR, ft]
    return {
        "lssf fuse": ([str(lssf), "fuse", "--finetuned", ft, "--patch", str(patch),
                       "--out", str(work / "out-lssf"), "--alpha", str(alpha)],
                      work / "out-lssf"),
        "mergekit-yaml task_arithmetic": (
            [str(mergekit), str(config), str(work / "out-mergekit"), "--no-write-model-card",
             "--no-copy-tokenizer", "--quiet"],
            work / "out-mergekit"),
        "I/O floor (load_file + save_file)": ([*floor, str(work / "out-floor"), "copy"],
                                              work / "out-floor"),
        "casting floor (2-D weights to fp32 and back)": (
            [*floor, str(work / "out-cast"), "cast"], work / "out-cast"),
    }  # fmt: skip


def run_all(work: Path, plan: dict, runs: int, env: dict[str, str]) -> dict[str, dict]:
    """Median wall/CPU and max RSS per contender over ``runs`` alternating rounds."""
    got: dict[str, list[dict]] = {name: [] for name in plan}
    for i in range(runs):
        for k, (name, (cmd, out)) in enumerate(plan.items()):
            shutil.rmtree(out, ignore_errors=True)  # every run writes new files, untimed
            os.sync()  # and starts without an earlier run's dirty pages (see fuse_speed.py)
            time.sleep(0.5)
            r = measure(cmd, env, work / f"log-{k}-{i}.txt")
            if (out / "vmhwm_kb").exists():
                r["self_vmhwm_mb"] = int((out / "vmhwm_kb").read_text()) / 1024
            got[name].append(r)
            print(f"run {i + 1}/{runs} {name}: {r['wall_s']:.2f} s", file=sys.stderr)
    return {
        name: {
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "self_vmhwm_mb": max((r.get("self_vmhwm_mb", 0.0) for r in rs), default=0.0),
        }
        for name, rs in got.items()
    }


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the shard holding it, over every ``*.safetensors`` file of ``folder``."""
    from safetensors import safe_open

    where = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            where.update(dict.fromkeys(fh.keys(), f))
    return where


def bf16_ulp(x):
    """One bf16 unit in the last place at |x| (8 significant bits): ``2^(e - 8)``, x = m 2^e."""
    import torch

    _, e = torch.frexp(x.abs().clamp_min(2.0**-126))
    return torch.ldexp(torch.ones_like(x), e - 8)


def compare(models: dict[str, Path], lssf_out: Path, mk_out: Path, alpha: float) -> dict:
    """Differences: lssf vs mergekit, and each vs the exact result computed in float64.

    Per pair: max abs difference, and the elements that differ by more than one bf16 ulp of
    the larger of the two values (more than a rounding step), with the largest such
    difference: where ``W_ft + delta`` cancels to ~0, a float32 residue of 1e-10 is "hundreds
    of ulps" of the tiny result yet nothing at the weights' scale.
    """
    import torch
    from safetensors import safe_open

    a_files, b_files = tensor_files(lssf_out), tensor_files(mk_out)
    if set(a_files) != set(b_files):
        missing = sorted(set(a_files) ^ set(b_files))[:5]
        raise RuntimeError(f"lssf and mergekit outputs hold different tensors, e.g. {missing}")
    src = {k: tensor_files(p) for k, p in models.items()}
    stats = {"tensors": 0, "identical": 0, "dtype_differs": 0, "elements": 0, "differing": 0}
    pairs = ("lssf_vs_mergekit", "lssf_vs_exact", "mergekit_vs_exact")
    worst = {k: {"max_abs": 0.0, "over_ulp": 0, "max_abs_over_ulp": 0.0} for k in pairs}

    def get(files: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(files[name], "pt") as fh:
            return fh.get_tensor(name)

    for name in sorted(a_files):
        a, b = get(a_files, name), get(b_files, name)
        w = 0.0 if any(u in name for u in UNPATCHED) else alpha
        ft, al, ref = (get(src[k], name).double() for k in ("finetuned", "aligned", "reference"))
        exact = (ft + w * (al - ref)).to(a.dtype).double()
        a64, b64 = a.double(), b.double()
        for key, (x, y) in zip(pairs, ((a64, b64), (a64, exact), (b64, exact)), strict=True):
            d = (x - y).abs()
            over = d > bf16_ulp(torch.maximum(x.abs(), y.abs()))
            got = worst[key]
            got["max_abs"] = max(got["max_abs"], float(d.max()))
            got["over_ulp"] += int(over.sum())
            if over.any():
                got["max_abs_over_ulp"] = max(got["max_abs_over_ulp"], float(d[over].max()))
        n_diff = int((a64 != b64).sum())
        stats["tensors"] += 1
        stats["identical"] += int(n_diff == 0)
        stats["dtype_differs"] += int(a.dtype != b.dtype)
        stats["elements"] += a.numel()
        stats["differing"] += n_diff
    return stats | worst


def print_report(res: dict[str, dict], agree: dict, meta: dict) -> None:
    import torch

    print(f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, OMP_NUM_THREADS="
          f"{meta['threads']}; {time.strftime('%Y-%m-%d %H:%M %Z')}. Checkpoint "
          f"{meta['gb']:.3f} GB bf16 ({meta['layers']} layers), full-rank patch "
          f"{meta['patch_gb']:.3f} GB; alpha {meta['alpha']}; median of {meta['runs']} "
          "alternating runs, whole processes; LSSF_HASH_CACHE="
          f"{os.environ.get('LSSF_HASH_CACHE', 'unset')} (once lssf caches input hashes, runs "
          "after the first hit the cache).\n")  # fmt: skip
    base, floor = res["lssf fuse"], res["I/O floor (load_file + save_file)"]
    print("| run | wall s | CPU s | peak RSS MB | lssf wall / this | lssf RSS / this | "
          "this / I/O floor |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{base['wall_s'] / r['wall_s']:.2f}x | {base['peak_rss_mb'] / r['peak_rss_mb']:.2f}x"
              f" | {r['wall_s'] / floor['wall_s']:.2f}x |")  # fmt: skip
    checks = [f"{n}: {r['self_vmhwm_mb']:.0f} MB" for n, r in res.items() if r["self_vmhwm_mb"]]
    print(f"\nPeak RSS check, the floors' own VmHWM: {'; '.join(checks)}.")
    m = agree
    share = m["differing"] / max(m["elements"], 1)
    print(f"Outputs: {m['tensors']} tensors, {m['identical']} with equal values in lssf and "
          f"mergekit ({m['dtype_differs']} stored in another dtype: mergekit's out_dtype casts "
          f"the float32 norms to bf16, lssf keeps the input's dtype); {m['differing']} of "
          f"{m['elements']} elements differ ({share:.2e}).")  # fmt: skip
    for key, label in (("lssf_vs_mergekit", "lssf vs mergekit"),
                       ("lssf_vs_exact", "lssf vs exact (float64, one bf16 rounding)"),
                       ("mergekit_vs_exact", "mergekit vs exact")):  # fmt: skip
        r = m[key]
        print(f"- {label}: max abs diff {r['max_abs']:.3e}; {r['over_ulp']} elements differ by "
              f"more than one bf16 ulp of the larger value, by at most "
              f"{r['max_abs_over_ulp']:.3e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1.0, help="checkpoint GB (1GB)")
    parser.add_argument("--runs", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="mergekit's venv")
    parser.add_argument("--workdir", type=Path, help="keep models, patch and outputs here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    mergekit = ensure_mergekit(args.venv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lssf-mergekit-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = make_models(work / f"models-{args.size:g}GB", args.size)
    patch = full_rank_patch(models, work / f"patch-{args.size:g}GB-full")
    plan = commands(work, models, patch, mergekit, args.alpha)
    env = os.environ | {"PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    res = run_all(work, plan, args.runs, env)
    agree = compare(models, work / "out-lssf", work / "out-mergekit", args.alpha)
    gb = sum(f.stat().st_size for f in models["finetuned"].glob("*.safetensors")) / 1e9
    meta = {"gb": gb, "layers": shape_for(args.size).layers, "alpha": args.alpha,
            "runs": args.runs, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "patch_gb": sum(f.stat().st_size for f in patch.iterdir()) / 1e9}  # fmt: skip
    print_report(res, agree, meta)
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

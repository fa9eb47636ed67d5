"""Issue #13's GPU row: extraction and fusion at Llama-7B shapes on CUDA and on the CPU.

Part 1, extraction: a bf16 trio of Llama-7B shape (hidden 4096, intermediate 11008, 32 heads,
vocab 32000) with only ``--extract-layers`` decoder layers (``lssf.synthetic.make_trio``);
``lssf.extract`` with ``device="cuda"`` and ``device="cpu"`` (default worker count), each timed
in this process (CUDA synchronised), with peak GPU memory; ranks per tensor CPU vs GPU and the
largest relative difference of the projected update ``U'C`` between the two patches.

Part 2, fusion: a full ``--layers``-layer bf16 fine-tune of that shape (~13.5 GB at 32 layers,
~5 GB shards, written like ``fuse_speed.write_finetune``) and a patch like
``fuse_speed.write_patch`` whose per-module ranks are part 1's (the GPU patch's where there is
one), repeated over every layer. Timed in this process, each after ``os.sync()`` (so no phase
pays for an earlier one's dirty pages) with the hash cache warm (a private ``LSSF_CACHE_DIR``,
as every fuse of an unchanged fine-tune after the first): the I/O floor (``load_file`` +
``save_file`` of every shard), ``lssf.fuse(device="cuda")`` and ``lssf.fuse(device="cpu")``,
each against the floor; then the two fused outputs compared tensor by tensor (bf16 ulps,
elements that differ), one tensor at a time. Outputs are deleted once compared; peak disk is
about three copies of the model (~41 GB at 7B).

Without CUDA the GPU rows say "skipped (no CUDA)" and the rest runs. Every phase prints a
progress line with the elapsed time to stderr; each part's table goes to stdout (and
``--out``) as soon as the part is done, so a run cut short keeps what it finished.

At 7B shapes the bf16 trio's safety deltas carry bf16 rounding noise (~5e-5 per element)
over millions of elements, so the entropy rule keeps much of the noise floor: expect ranks in
the hundreds to thousands and the full-SVD fallback (see "by full SVD"; estimated from the
spectrum, not yet measured). Float32 factors at rank r take ``4 r (d_out + d_in)`` bytes, more
than the bf16 weight itself past r ~ 1500 (11008x4096): repeated over 32 layers that patch
alone would not fit beside three models, so part 2 caps the ranks at ``--max-fuse-rank`` and
at whatever fits ``--disk-gb`` (48 GB: fine-tune + two outputs + patch), and says so.

GPU machine (one H200, 16 cores; lssf needs pydantic there): ``PYTHONUNBUFFERED=1 python3
benchmarks/gpu_7b.py --extract-layers 1 --max-fuse-rank 256 --out $OUT/gpu_7b.md``, about
4-8 minutes. Functional check anywhere, well under a minute:
``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_7b.py --tiny``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(ROOT))  # lssf from this checkout, installed or not
import fuse_speed  # noqa: E402

from lssf.synthetic import LlamaShape, make_trio, write_checkpoint  # noqa: E402

T0 = time.perf_counter()
SEVEN_B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "extract_layers": 2,
           "heads": 32, "kv_heads": 32, "vocab": 32000, "shard_bytes": 5_000_000_000}  # fmt: skip
TINY = {"hidden": 256, "intermediate": 688, "layers": 2, "extract_layers": 2, "heads": 4,
        "kv_heads": 4, "vocab": 512, "shard_bytes": 1_500_000}  # fmt: skip
PHASES = ("gpu-extract", "cpu-extract", "floor", "gpu-fuse", "cpu-fuse", "compare")
NO_CUDA = "skipped (no CUDA)"
MIB = 2**20
WORK = Path(tempfile.gettempdir())  # the run's folder, once made: disk free is reported there


def progress(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


class Report:
    """Markdown printed to stdout and appended to ``--out`` as it is produced."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.out is not None:
            with self.out.open("a") as fh:
                fh.write(text + "\n")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def free_gb(folder: Path) -> float:
    return shutil.disk_usage(folder).free / 1e9


def model_bytes(shape: LlamaShape) -> int:
    """Bytes of ``shape`` as ``write_checkpoint`` stores it: bf16 matrices, float32 vectors."""
    total = 0
    for _, s in shape.tensors():
        n = 1
        for d in s:
            n *= d
        total += n * (2 if len(s) > 1 else 4)
    return total


def reset_rss_peak() -> bool:
    """Reset the process's ``VmHWM`` (Linux: ``5`` to ``clear_refs``); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def sync(enabled: bool, why: str) -> None:
    """Dirty pages written out, untimed, so the next phase starts from a clean page cache."""
    if not enabled:
        return
    t = time.perf_counter()
    os.sync()
    progress(f"sync ({why}): {time.perf_counter() - t:.1f} s")


_warm = False


def cuda_warmup() -> float:
    """CUDA context, cuBLAS and cuSOLVER handles made before any timed phase; its seconds."""
    global _warm
    if _warm:
        return 0.0
    t = time.perf_counter()
    a = torch.randn(256, 128, device="cuda", dtype=torch.float64)
    torch.linalg.qr(a)
    torch.linalg.svdvals(a.float())
    torch.linalg.svd(a.float(), full_matrices=False)
    torch.linalg.eigh(a.T @ a)
    torch.linalg.eigvalsh(a.T @ a)
    torch.addmm(a.float(), a.float(), a.float().T[:, :128])
    torch.cuda.synchronize()
    _warm = True
    return time.perf_counter() - t


def timed(name: str, fn: Callable[[], object], cuda: bool) -> dict:
    """Wall and CPU seconds of ``fn()`` (CUDA synchronised), peak GPU memory and peak RSS.

    An exception is recorded (and its traceback printed), not raised: the other rows still run.
    """
    progress(f"{name}: start (disk free {free_gb(WORK):.1f} GB)")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_ok = reset_rss_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    result: dict = {"error": None, "value": None}
    try:
        result["value"] = fn()
        if cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # a failed row is a result too
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    result["wall_s"] = time.perf_counter() - t0
    result["cpu_s"] = time.process_time() - c0
    result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / MIB if cuda else None
    result["rss_peak_mib"] = rss_peak_mib() if rss_ok else None
    state = f"FAILED ({result['error']})" if result["error"] else "done"
    progress(f"{name}: {state} in {result['wall_s']:.1f} s (CPU {result['cpu_s']:.1f} s)")
    return result


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def machine_line() -> str:
    from lssf._version import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    cuda = f" (CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = "no git"
    return (
        f"Machine: torch {torch.__version__}, {gpu}{cuda}, {os.cpu_count()} CPUs "
        f"({usable} usable), torch threads {torch.get_num_threads()}, lssf {__version__} "
        f"({rev}), {time.strftime('%Y-%m-%d %H:%M')}"
    )


# ---------------------------------------------------------------- part 1: extraction


class Fallbacks(logging.Handler):
    """Counts ``lssf.lowrank``'s "full SVD (why)" debug records: tensors off the fast path."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.why: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "full SVD (" in msg:
            self.why[msg.split("full SVD (", 1)[1].rstrip(")")] += 1


def run_extract(trio: dict[str, Path], out: Path, dev: str) -> dict:
    from lssf import extract
    from lssf.extract import default_workers

    workers = default_workers(torch.device(dev))
    logger, handler = logging.getLogger("lssf.lowrank"), Fallbacks()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        r = timed(
            f"extract on {dev} ({workers} workers)",
            lambda: extract(trio["aligned"], trio["reference"], out, device=dev, progress=False),
            cuda=dev == "cuda",
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    full = sum(handler.why.values())
    progress(f"extract on {dev}: {full} tensor(s) by full SVD {dict(handler.why)}")
    return r | {"workers": workers, "full_svd": full, "why": dict(handler.why)}


def projected_diffs(gpu: Path, cpu: Path, dev: str) -> dict[str, float]:
    """Per tensor ``||U_g C_g - U_c C_c||_F / ||U_c C_c||_F`` in float64 on ``dev``."""
    from lssf.patch import SafetyPatch

    out = {}
    with SafetyPatch.load(gpu) as pg, SafetyPatch.load(cpu) as pc:
        for name in pc.manifest.tensors:
            ug, cg = (t.to(dev, torch.float64) for t in pg.factors(name))
            uc, cc = (t.to(dev, torch.float64) for t in pc.factors(name))
            want = uc @ cc
            norm = float(torch.linalg.matrix_norm(want))
            diff = float(torch.linalg.matrix_norm(ug @ cg - want))
            out[name] = diff / norm if norm > 0 else diff
            del ug, cg, uc, cc, want
    return out


def rank_summary(ranks: dict[str, int]) -> str:
    v = list(ranks.values())
    return f"{min(v)} / {statistics.median(v):g} / {max(v)}" if v else "-"


def shape_of(args: argparse.Namespace, layers: int) -> LlamaShape:
    """The 7B-shaped (or overridden) model with ``layers`` decoder layers."""
    return LlamaShape(
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
    )


def extraction(args: argparse.Namespace, root: Path, cuda: bool, say: Report) -> dict | None:
    """Part 1; returns the ranks of the patch that part 2 copies (GPU's, else CPU's), or None."""
    from lssf.patch import SafetyPatch

    shape = shape_of(args, args.extract_layers)
    if "cpu-extract" in args.skip and ("gpu-extract" in args.skip or not cuda):
        return None  # nothing would extract: no trio
    progress(
        f"extraction: writing the bf16 trio ({args.extract_layers} layers, "
        f"{3 * model_bytes(shape) / 1e9:.3g} GB)"
    )
    trio = make_trio(root / "trio", shape, dtype=torch.bfloat16)
    gb = folder_bytes(trio["aligned"]) / 1e9
    progress(f"extraction: trio written ({gb:.3g} GB per model)")
    runs: dict[str, dict | str] = {}
    init_s = None
    if "gpu-extract" in args.skip:
        runs["cuda"] = "skipped (--skip)"
    elif not cuda:
        runs["cuda"] = NO_CUDA
    else:
        init_s = cuda_warmup()
        progress(f"CUDA warm-up (context, cuBLAS, cuSOLVER; untimed): {init_s:.1f} s")
        runs["cuda"] = run_extract(trio, root / "patch-cuda", "cuda")
    if "cpu-extract" in args.skip:
        runs["cpu"] = "skipped (--skip)"
    else:
        runs["cpu"] = run_extract(trio, root / "patch-cpu", "cpu")
    if not args.keep:
        shutil.rmtree(root / "trio")  # reference, aligned (and the trio's fine-tune): done
        progress("extraction: trio deleted")
    patches = {
        dev: root / f"patch-{dev}"
        for dev, r in runs.items()
        if isinstance(r, dict) and r["error"] is None
    }
    ranks = {dev: SafetyPatch.load(p).ranks() for dev, p in patches.items()}

    say(
        f"\n### Part 1: extraction, {args.extract_layers} decoder layer(s) of a bf16 "
        f"{args.hidden}/{args.intermediate} Llama trio ({gb:.3g} GB per model), in process\n"
    )
    say(
        "| device | workers | wall s | CPU s | peak GPU MiB | peak RSS MiB | tensors "
        "| by full SVD | rank min / median / max | factors MB |"
    )
    say("|---|---|---|---|---|---|---|---|---|---|")
    for dev, r in runs.items():
        if isinstance(r, str):
            say(f"| {dev} | {r} | | | | | | | | |")
            continue
        if r["error"]:
            say(
                f"| {dev} | {r['workers']} | FAILED after {r['wall_s']:.2f} s: {r['error']} "
                "| | | | | | | |"
            )
            continue
        fac = folder_bytes(patches[dev]) / 1e6
        say(
            f"| {dev} | {r['workers']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{mib(r['gpu_peak_mib'])} | {mib(r['rss_peak_mib'])} | {len(ranks[dev])} | "
            f"{r['full_svd']} | {rank_summary(ranks[dev])} | {fac:.1f} |"
        )
    if init_s is not None:
        say(f"\nCUDA warm-up before the GPU row (untimed): {init_s:.2f} s.")
    why = {d: r["why"] for d, r in runs.items() if isinstance(r, dict) and r.get("why")}
    if why:
        say("\nWhy full SVD (lssf.lowrank): " + "; ".join(f"{d}: {w}" for d, w in why.items()))
    if "cuda" in ranks and "cpu" in ranks:
        diffs = projected_diffs(patches["cuda"], patches["cpu"], "cuda" if cuda else "cpu")
        names = list(ranks["cpu"])
        n_diff = sum(ranks["cuda"][n] != ranks["cpu"][n] for n in names)
        worst = max(diffs, key=diffs.get)
        say(
            f"\nRanks CPU vs GPU: {n_diff} of {len(names)} tensors differ. Largest relative "
            f"difference of the projected update U'C (GPU patch vs CPU patch, float64): "
            f"{diffs[worst]:.1e} ({worst}); criterion vs exact 1e-5.\n"
        )
        say("| tensor | shape | GPU rank | CPU rank | U'C rel. diff |")
        say("|---|---|---|---|---|")
        dims = dict(shape.tensors())
        for n in names:
            d = "x".join(map(str, dims[n]))
            flag = "" if ranks["cuda"][n] == ranks["cpu"][n] else " (rank differs)"
            say(
                f"| {n.removeprefix('model.')} | {d} | {ranks['cuda'][n]} | {ranks['cpu'][n]} "
                f"| {diffs[n]:.1e}{flag} |"
            )
    elif ranks:
        dev = next(iter(ranks))
        other = runs["cuda" if dev == "cpu" else "cpu"]
        why = other if isinstance(other, str) else "its row failed"
        per = ", ".join(f"{n.removeprefix('model.layers.')} {r}" for n, r in ranks[dev].items())
        say(f"\nRanks CPU vs GPU: not compared (the other device: {why}). {dev} ranks: {per}")
    source = "cuda" if "cuda" in ranks else "cpu" if "cpu" in ranks else None
    if source is None:
        return None
    rows = [
        tuple(ranks[source][f"model.layers.{n}.{m}.weight"] for m in fuse_speed.MODULES)
        for n in range(args.extract_layers)
    ]
    return {"source": source, "rows": rows}


# ---------------------------------------------------------------- part 2: fusion


def write_finetune(folder: Path, shape: LlamaShape, shard_bytes: int, cuda: bool) -> None:
    """``fuse_speed.write_finetune``'s checkpoint in ``shard_bytes`` shards.

    The same values (``randn * 0.02`` seeded by name, norms ones) on the CPU; with CUDA the
    normals are drawn on the GPU (other values, same distribution), which is faster.
    """

    def make(name: str, s: tuple[int, ...]) -> torch.Tensor:
        if len(s) == 1:
            return torch.ones(s)
        seed = sum(map(ord, name))
        if cuda:
            g = torch.Generator(device="cuda").manual_seed(seed)
            return (torch.randn(s, generator=g, device="cuda") * 0.02).bfloat16().cpu()
        g = torch.Generator().manual_seed(seed)
        return torch.randn(s, generator=g) * 0.02

    write_checkpoint(folder, shape, make, dtype=torch.bfloat16, shard_bytes=shard_bytes)


def io_floor(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in sorted(src.glob("*.safetensors")):
        t = load_file(f)
        save_file(t, dst / f.name, metadata={"format": "pt"})
        del t


_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Float bits as integers in value order (sign-magnitude to two's complement), +-0 equal."""
    size = t.element_size()
    wide = t.view(_INT[size]).to(torch.int32 if size <= 2 else torch.int64)
    mag = wide & ((1 << (8 * size - 1)) - 1)
    return torch.where(wide < 0, -mag, mag)


def compare_outputs(a: Path, b: Path, targets: set[str], dev: str) -> dict:
    """Tensor by tensor (one in memory at a time): ulps and differing elements of ``a`` vs ``b``."""
    from safetensors import safe_open

    got = {
        "tensors": 0,
        "elements": 0,
        "differing": 0,
        "tensors_differing": 0,
        "max_ulps": 0,
        "worst": None,
        "untouched_differing": 0,
        "mismatched": [],
    }
    files = sorted(f.name for f in a.glob("*.safetensors"))
    if files != sorted(f.name for f in b.glob("*.safetensors")):
        got["mismatched"].append("shard names differ")
    for fname in files:
        if not (b / fname).exists():
            continue
        with safe_open(a / fname, "pt") as fa, safe_open(b / fname, "pt") as fb:
            keys_b = set(fb.keys())
            for k in fa.keys():  # noqa: SIM118 - safe_open is no mapping
                if k not in keys_b:
                    got["mismatched"].append(k)
                    continue
                x, y = fa.get_tensor(k), fb.get_tensor(k)
                if x.shape != y.shape or x.dtype != y.dtype:
                    got["mismatched"].append(k)
                    continue
                x, y = x.to(dev), y.to(dev)
                got["tensors"] += 1
                got["elements"] += x.numel()
                ix, iy = x.view(_INT[x.element_size()]), y.view(_INT[y.element_size()])
                n = int((ix != iy).sum())
                if n == 0:
                    continue
                got["differing"] += n
                got["tensors_differing"] += 1
                got["untouched_differing"] += k not in targets
                if x.is_floating_point():
                    ulps = int((ordered_bits(x) - ordered_bits(y)).abs().max())
                    if ulps > got["max_ulps"]:
                        got["max_ulps"], got["worst"] = ulps, k
                del x, y, ix, iy
    return got


def capped_ranks(
    table: list[tuple[int, ...]], shape: LlamaShape, max_rank: int | None, budget: float
) -> tuple[list[tuple[int, ...]], int | None, int]:
    """``table`` with every rank at most ``max_rank``, lowered further until the float32
    factors (``4 r (d_out + d_in)`` bytes per tensor, every layer) fit in ``budget`` bytes.

    Returns the rows, the cap applied (None: none) and the patch's bytes.
    """
    dims = dict(shape.tensors())

    def nbytes(cap: int) -> int:
        total = 0
        for n in range(shape.layers):
            for module, r in zip(fuse_speed.MODULES, table[n % len(table)], strict=True):
                d_out, d_in = dims[f"model.layers.{n}.{module}.weight"]
                total += 4 * min(r, cap) * (d_out + d_in)
        return total

    top = max(max(row) for row in table)
    cap = top if max_rank is None else min(max_rank, top)
    if nbytes(cap) > budget:  # the largest cap that fits
        lo, hi = 0, cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if nbytes(mid) <= budget else (lo, mid - 1)
        cap = lo
    rows = [tuple(min(r, cap) for r in row) for row in table]
    return rows, (cap if cap < top else None), nbytes(cap)


def fusion(args: argparse.Namespace, root: Path, cuda: bool, ranks: dict | None, say: Report):
    from lssf import fuse
    from lssf.hashcache import ENV_DIR, ENV_SWITCH
    from lssf.patch import SafetyPatch

    shape = shape_of(args, args.layers)
    size = model_bytes(shape)
    need = 3 * size / 1e9 + 1.0
    if free_gb(root) < need:
        raise SystemExit(
            f"fusion needs ~{need:.1f} GB free under {root}, "
            f"{free_gb(root):.1f} GB free; use --workdir or fewer --layers"
        )
    # The fine-tune, two fused outputs and the patch on disk at once: the patch gets the rest
    # of --disk-gb (and of the free space), its ranks capped to fit.
    budget = min(args.disk_gb * 1e9, free_gb(root) * 1e9 - 1e9) - 3 * size
    measured = fuse_speed.RANKS if ranks is None else ranks["rows"]
    rows, cap, patch_est = capped_ranks(measured, shape, args.max_fuse_rank, budget)
    n_capped = 0
    if cap is not None:
        n_capped = sum(r > cap for n in range(shape.layers) for r in measured[n % len(measured)])
    capped = (
        ""
        if cap is None
        else f"; capped at rank {cap} ({n_capped} of {7 * shape.layers} tensors; "
        f"--max-fuse-rank {args.max_fuse_rank}, --disk-gb {args.disk_gb:g})"
    )
    ft, patch = root / "finetuned", root / "patch"
    progress(
        f"fusion: writing the {args.layers}-layer bf16 fine-tune ({size / 1e9:.3g} GB, "
        f"normals drawn on {'the GPU' if cuda else 'the CPU'})"
    )
    write_finetune(ft, shape, args.shard_bytes, cuda)
    shards = len(list(ft.glob("*.safetensors")))
    source = (
        "fuse_speed.RANKS (no extraction ran)"
        if ranks is None
        else f"part 1's {ranks['source']} patch, its {len(rows)} layer(s) repeated"
    ) + capped
    progress(
        f"fusion: fine-tune written ({shards} shards); writing the patch (ranks: {source}; "
        f"~{patch_est / 1e9:.3g} GB)"
    )
    fuse_speed.write_patch(patch, ft, shape, ranks=rows)
    p_ranks = SafetyPatch.load(patch).ranks()
    patch_gb = folder_bytes(patch) / 1e9
    progress(f"fusion: patch written ({len(p_ranks)} tensors, {patch_gb:.3g} GB)")
    cache = root / "hash-cache"
    os.environ[ENV_DIR] = str(cache)  # never the user's cache
    if args.hash_cache == "off":
        os.environ[ENV_SWITCH] = "0"
    else:
        t = time.perf_counter()
        fuse_speed.warm_cache(ft, cache)
        progress(f"fusion: hash cache warmed (untimed) in {time.perf_counter() - t:.1f} s")
    sync(not args.no_sync, "after writing the fine-tune")

    results: dict[str, dict | str] = {}
    if "floor" in args.skip:
        results["floor"] = "skipped (--skip)"
    else:
        results["floor"] = timed("I/O floor", lambda: io_floor(ft, root / "copy"), cuda=False)
        shutil.rmtree(root / "copy", ignore_errors=True)  # its dirty pages dropped unwritten
        progress("I/O floor: copy deleted")
    outs: dict[str, Path] = {}
    for dev, phase in (("cuda", "gpu-fuse"), ("cpu", "cpu-fuse")):
        if phase in args.skip:
            results[dev] = "skipped (--skip)"
            continue
        if dev == "cuda" and not cuda:
            results[dev] = NO_CUDA
            continue
        if dev == "cuda":
            cuda_warmup()
        sync(not args.no_sync, f"before fuse on {dev}")
        out = root / f"fused-{dev}"
        results[dev] = timed(
            f"fuse on {dev}",
            lambda d=dev, o=out: fuse(ft, patch, o, device=d, progress=False),
            cuda=dev == "cuda",
        )
        if results[dev]["error"] is None:
            outs[dev] = out
        else:
            shutil.rmtree(out, ignore_errors=True)
    compared = None
    if len(outs) == 2 and "compare" not in args.skip:
        if not args.keep:
            shutil.rmtree(ft)  # both fuses are done: the input is not needed any more
            progress("fusion: fine-tune deleted")
        r = timed(
            "compare GPU vs CPU output",
            lambda: compare_outputs(
                outs["cuda"], outs["cpu"], set(p_ranks), "cuda" if cuda else "cpu"
            ),
            cuda=cuda,
        )
        compared = r
    if not args.keep:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        progress("fusion: outputs deleted")

    mode = "warm" if args.hash_cache == "warm" else "off (LSSF_HASH_CACHE=0: every shard hashed)"
    say(
        f"\n### Part 2: fusion, {args.layers}-layer bf16 {args.hidden}/{args.intermediate} "
        f"Llama ({size / 1e9:.3g} GB, {shards} shards), in process\n"
    )
    say(
        f"Patch: {len(p_ranks)} tensors, ranks min / median / max {rank_summary(p_ranks)} "
        f"({source}), {patch_gb:.3g} GB of factors. Hash cache {mode}; "
        f"{'no sync' if args.no_sync else 'os.sync() before each row'}; fine-tune in the "
        "page cache (just written).\n"
    )
    say("| operation | wall s | CPU s | GB/s | / floor | peak GPU MiB | peak RSS MiB |")
    say("|---|---|---|---|---|---|---|")
    labels = {
        "floor": "I/O floor (load_file + save_file)",
        "cuda": "lssf.fuse, device=cuda",
        "cpu": "lssf.fuse, device=cpu",
    }
    floor = results.get("floor")
    floor_s = floor["wall_s"] if isinstance(floor, dict) and not floor["error"] else None
    for key, r in results.items():
        if isinstance(r, str):
            say(f"| {labels[key]} | {r} | | | | | |")
        elif r["error"]:
            say(f"| {labels[key]} | FAILED after {r['wall_s']:.2f} s: {r['error']} | | | | | |")
        else:
            ratio = f"{r['wall_s'] / floor_s:.2f}x" if floor_s else "-"
            say(
                f"| {labels[key]} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                f"{size / 1e9 / r['wall_s']:.3g} | {ratio} | {mib(r['gpu_peak_mib'])} | "
                f"{mib(r['rss_peak_mib'])} |"
            )
    if compared is None:
        why = "a fuse row is missing" if len(outs) < 2 else "skipped (--skip)"
        say(f"\nGPU vs CPU fused output: not compared ({why}).")
    elif compared["error"]:
        say(f"\nGPU vs CPU fused output: comparison FAILED: {compared['error']}")
    else:
        c = compared["value"]
        worst = f" ({c['worst']})" if c["worst"] else ""
        bad = f"; MISMATCHED: {c['mismatched'][:5]}" if c["mismatched"] else ""
        say(
            f"\nGPU vs CPU fused output ({compared['wall_s']:.1f} s to compare): "
            f"{c['tensors_differing']} of {c['tensors']} tensors differ, "
            f"{c['differing']:,} of {c['elements']:,} elements; largest difference "
            f"{c['max_ulps']} ulp(s) of the tensor's dtype (bf16 weights){worst}; "
            "untouched tensors differing: "
            f"{c['untouched_differing']}{bad}."
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="hidden 256, intermediate 688, 2 layers, vocab 512 (CPU: seconds)",
    )
    for name, default in SEVEN_B.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, type=int, default=None, help=f"default {default} (--tiny: {TINY[name]})"
        )
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the workdir and every output")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    parser.add_argument("--skip", default="", help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--hash-cache", choices=("warm", "off"), default="warm")
    parser.add_argument("--no-sync", action="store_true", help="no os.sync() between rows")
    parser.add_argument(
        "--max-fuse-rank", type=int, help="cap the part 2 patch's ranks (default: as measured)"
    )
    parser.add_argument(
        "--disk-gb",
        type=float,
        default=48.0,
        help="part 2's disk use (3 models + patch) at most this; ranks capped to fit (48)",
    )
    args = parser.parse_args()
    preset = TINY if args.tiny else SEVEN_B
    for name, default in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - set(PHASES):
        parser.error(f"unknown --skip {sorted(args.skip - set(PHASES))}; known: {PHASES}")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    return args


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    say = Report(args.out)
    say(machine_line())
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="lssf-gpu7b-", dir=args.workdir))
    else:
        root = Path(tempfile.mkdtemp(prefix="lssf-gpu7b-"))
    global WORK
    WORK = root
    progress(
        f"workdir {root} ({free_gb(root):.1f} GB free); CUDA: "
        f"{torch.cuda.get_device_name(0) if cuda else 'none'}"
    )
    try:
        ranks = extraction(args, root, cuda, say)
        fusion(args, root, cuda, ranks, say)
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    progress("all done")


if __name__ == "__main__":
    main()

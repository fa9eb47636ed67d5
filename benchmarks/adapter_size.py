"""On-disk size of a re-aligned LoRA fine-tune: merged model folder vs. PEFT adapter.

For a generated Llama-shaped checkpoint (``lssf.synthetic``, about 1.2 GB in float32 by
default) and, when it has been built, the model organism (``evaluation.organism``):

1. extract the safety patch from the aligned/reference pair;
2. take a LoRA fine-tune of the aligned model (the organism's own adapter, or a generated
   r = 16 LoRA on every linear layer, as in the paper's experiments);
3. ``fuse --format model`` (merged folder), ``fuse --format adapter`` (combined adapter) and
   ``patch export-adapter`` (the patch alone), and print every folder's size.

Usage::

    python benchmarks/adapter_size.py [--workdir DIR] [--layers 20] [--organism DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from lssf import PatchConfig, extract, fuse
from lssf.adapter_out import AdapterWriter, export_patch_adapter
from lssf.checkpoint import Checkpoint
from lssf.synthetic import LlamaShape, make_trio

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GB"


def synthetic_lora(aligned: Path, out: Path, rank: int = 16, alpha: float = 32.0) -> Path:
    """A LoRA fine-tune of ``aligned`` on every linear layer (random factors, PEFT layout)."""
    gen = torch.Generator().manual_seed(0)
    out.mkdir(parents=True)
    with Checkpoint(aligned) as ckpt:
        dtype = next(ckpt.info(n).torch_dtype for n in ckpt.names() if n.endswith("q_proj.weight"))
        writer = AdapterWriter(out, dtype)
        for name in ckpt.names():
            if not name.endswith(tuple(f"{m}.weight" for m in LINEAR)):
                continue
            d_out, d_in = ckpt.info(name).shape
            a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
            b = torch.randn(d_out, rank, generator=gen) * 0.01
            writer.module(name.removesuffix(".weight"), (a, b))
        # Written as a plain rank-16 LoRA: one r and one lora_alpha, no patterns.
        writer.close(
            str(aligned), r=rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={},
            target_modules=list(LINEAR),
        )  # fmt: skip
    return out


def measure(
    label: str,
    aligned: Path,
    reference: Path,
    adapter: Path | None,
    work: Path,
    max_rank: int | None = None,
) -> None:
    """Extract, fuse both ways, export the patch, and print the sizes."""
    rows: list[tuple[str, Path, float]] = []
    t = time.perf_counter()
    config = PatchConfig(max_rank=max_rank)
    patch = extract(aligned, reference, work / "patch", config, progress=False)
    rows.append(("safety patch (lssf format)", work / "patch", time.perf_counter() - t))
    if adapter is None:
        adapter = synthetic_lora(aligned, work / "lora_finetune")
    rows.append(("LoRA fine-tune (input adapter)", adapter, 0.0))
    for fmt in ("model", "adapter"):
        t = time.perf_counter()
        fuse(
            adapter,
            patch,
            work / f"fused_{fmt}",
            aligned=aligned,
            output_format=fmt,
            progress=False,
        )
        rows.append((f"fuse --format {fmt}", work / f"fused_{fmt}", time.perf_counter() - t))
    t = time.perf_counter()
    export_patch_adapter(patch, work / "patch_adapter", progress=False)
    rows.append(("patch export-adapter (fp32)", work / "patch_adapter", time.perf_counter() - t))
    ranks = [rec.rank for rec in patch.manifest.tensors.values()]
    print(f"\n## {label}, patch max_rank={max_rank}")
    print(f"aligned model: {human(folder_bytes(aligned))} ({aligned})")
    print(f"patch: {len(ranks)} tensors, rank {min(ranks)}-{max(ranks)}")
    print("| output | size | bytes | seconds |\n|---|---|---|---|")
    for name, folder, secs in rows:
        size = folder_bytes(folder)
        print(f"| {name} | {human(size)} | {size} | {secs:.1f} |")
    merged, combined = folder_bytes(work / "fused_model"), folder_bytes(work / "fused_adapter")
    print(f"merged / combined adapter: {merged / combined:.0f}x")
    sys.stdout.flush()


def synthetic(work: Path, layers: int, max_ranks: list[int | None]) -> None:
    shape = LlamaShape(hidden=1024, intermediate=2816, layers=layers, heads=16, kv_heads=4,
                       vocab=32000)  # fmt: skip
    t = time.perf_counter()
    trio = make_trio(work / "trio", shape, seed=0)
    print(f"generated trio in {time.perf_counter() - t:.0f}s", flush=True)
    for max_rank in max_ranks:
        sub = work / f"max_rank_{max_rank}"
        measure(f"synthetic Llama (hidden 1024, {layers} layers, float32)", trio["aligned"],
                trio["reference"], None, sub, max_rank)  # fmt: skip
        shutil.rmtree(sub, ignore_errors=True)


def organism(work: Path, root: Path | None, max_ranks: list[int | None]) -> None:
    root = root or Path(os.environ.get("LSSF_TEST_CACHE", Path.home() / ".cache/lssf-tests"))
    root = root / "organism-lora-seed3" if (root / "organism-lora-seed3").is_dir() else root
    try:
        import evaluation.organism  # noqa: F401
    except ImportError as exc:
        print(f"\n## organism\nnot measured: evaluation.organism is not importable ({exc})")
        return
    if not (root / "aligned").is_dir() or not (root / "base").is_dir():
        print(f"\n## organism\nnot measured: no built organism at {root} (build it with "
              "`lssf organism build --seed 0 --out DIR`, then --organism DIR)")  # fmt: skip
        return
    adapter = root / "finetuned_adapter"
    for max_rank in max_ranks:
        measure(f"model organism ({root})", root / "aligned", root / "base",
                adapter if adapter.is_dir() else None, work / f"max_rank_{max_rank}",
                max_rank)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".state/bench/adapter_size"))
    parser.add_argument("--layers", type=int, default=20, help="synthetic model depth")
    parser.add_argument("--organism", type=Path, help="built organism folder (default: test cache)")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument(
        "--max-rank", type=int, action="append", help="also measure a rank-capped patch"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    max_ranks = [None, *(args.max_rank or [])]
    try:
        if not args.skip_synthetic:
            synthetic(args.workdir / "synthetic", args.layers, max_ranks)
        organism(args.workdir / "organism", args.organism, max_ranks)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

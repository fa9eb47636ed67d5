"""CUDA check of the core: same patch and fused weights on GPU as on CPU, and timings.

Run on a machine with a GPU: ``python benchmarks/gpu_check.py``. Prints one table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lssf import extract, fuse
from lssf.synthetic import LlamaShape, make_trio

SHAPE = LlamaShape(hidden=2048, intermediate=5632, layers=2, heads=16, kv_heads=16, vocab=8000)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.__version__, torch.cuda.get_device_name(0))
    root = Path(tempfile.mkdtemp())
    trio = make_trio(root, SHAPE, dtype=torch.bfloat16)
    rows = []
    results = {}
    for dev in ("cpu", "cuda"):
        patch, t_ex = timed(
            lambda d=dev: extract(
                trio["aligned"], trio["reference"], root / f"p-{d}", device=d, progress=False
            )
        )
        _, t_fu = timed(
            lambda d=dev, p=patch: fuse(
                trio["finetuned"], p, root / f"o-{d}", device=d, progress=False
            )
        )
        results[dev] = (patch, tensors(root / f"o-{dev}"))
        rows.append((dev, t_ex, t_fu))
    (p_cpu, o_cpu), (p_gpu, o_gpu) = results["cpu"], results["cuda"]
    r_cpu, r_gpu = p_cpu.ranks(), p_gpu.ranks()
    n_diff = sum(r_cpu[k] != r_gpu[k] for k in r_cpu)
    max_dr = max(abs(r_cpu[k] - r_gpu[k]) for k in r_cpu)
    worst = 0.0
    for name, w in o_cpu.items():
        diff = (o_gpu[name].float() - w.float()).abs().max().item()
        worst = max(worst, diff / max(w.float().abs().max().item(), 1e-12))
    print("| device | extract s | fuse s |\n|---|---|---|")
    for dev, t_ex, t_fu in rows:
        print(f"| {dev} | {t_ex:.2f} | {t_fu:.2f} |")
    print(
        f"ranks: {n_diff}/{len(r_cpu)} tensors differ CPU vs GPU, by at most {max_dr}; "
        f"CPU ranks {min(r_cpu.values())}-{max(r_cpu.values())}"
    )
    print(f"largest relative difference of fused weights (bf16): {worst:.2e}")


if __name__ == "__main__":
    main()

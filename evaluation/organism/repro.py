"""Reproducible CPU training: the same seed and config give the same bytes on one machine.

Measured: identical across thread counts and ATen kernels on one machine; NOT across machines
(another machine of the project's kind rebuilt seed 3 with other bytes under the same cache key,
see data/organisms/README.md), although the recipe below aims at it.

Why the same seed alone is not enough: torch picks its CPU kernels at run time (ATen's
`default`, `avx2` or `avx512` builds of every vectorised op, with different reduction orders
and FMA contraction) and MKL picks a GEMM code path per processor and thread count. Each choice
rounds differently, training amplifies the difference, and the same seed gave refusal 1.000 on
one machine and 0.722 on another.

The recipe pins every one of those choices before torch is imported, so training runs one code
path whatever the machine:

- `ATEN_CPU_CAPABILITY=default`: ATen's baseline x86-64 kernels (no AVX, no FMA), compiled once
  into the wheel and run as such on any CPU;
- `MKL_CBWR=COMPATIBLE`: MKL's conditional numerical reproducibility on its SSE2 branch, which
  Intel documents as giving the same results on every Intel and compatible (AMD) processor;
- one thread (OpenMP, MKL and torch), so no reduction is split differently;
- oneDNN off, CUDA hidden, `torch.use_deterministic_algorithms(True)`.

What stays fixed by the cache key instead: the versions of torch, transformers, peft and
tokenizers (another build may ship other kernels) and the machine architecture. Both are
recorded in each organism's manifest. The cost: about 4x slower training than the unpinned
AVX-512 path (0.45 s against 0.11 s per step of the default organism on one core).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Literal

RECIPE = "aten-default+mkl-cbwr-compatible+1-thread+no-onednn/v1"
# The unpinned alternative for studies that need many organisms: this machine's own kernels on
# one thread, about 4x faster. Deterministic on one machine; its cache key records the kernels
# (`cpu_capability`), and nothing claims the bytes match another machine's.
NATIVE_RECIPE = "native-kernels+1-thread/v1"
Numerics = Literal["pinned", "native"]

PINNED_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONHASHSEED": "0",
}
# Settings a caller may have that would otherwise reach MKL or oneDNN in the child.
CLEARED_ENV = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "KMP_AFFINITY")


class NotPinnedError(RuntimeError):
    """Training was asked for in a process whose numerics are not pinned."""


def versions(numerics: Numerics = "pinned") -> dict[str, str]:
    """Everything besides the recipe that decides which kernels run: part of the cache key.
    Native numerics add the kernels this process runs (they differ between CPUs)."""
    import peft
    import tokenizers
    import torch
    import transformers

    found = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
        "machine": platform.machine(),
        "recipe": RECIPE if numerics == "pinned" else NATIVE_RECIPE,
    }
    if numerics == "native":
        found["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return found


def pinned_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the recipe's settings forced."""
    env = dict(os.environ if base is None else base)
    for name in CLEARED_ENV:
        env.pop(name, None)
    return env | PINNED_ENV


def problems() -> list[str]:
    """What in this process differs from the recipe (empty when training may start)."""
    import torch

    found = [
        f"{name}={os.environ.get(name)!r} (want {value!r})"
        for name, value in PINNED_ENV.items()
        if os.environ.get(name) != value
    ]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT":
        found.append(f"torch runs {capability} kernels (want DEFAULT: set before importing torch)")
    return found


@contextlib.contextmanager
def pinned_numerics(numerics: Numerics = "pinned") -> Iterator[None]:
    """Training context: refuse unless the process is pinned (native: no check); one thread,
    deterministic ops."""
    import torch

    wrong = problems() if numerics == "pinned" else []
    if wrong:
        raise NotPinnedError(
            "bit-identical training needs a pinned process (run_pinned does it): "
            + "; ".join(wrong)
        )
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def run_pinned(module: str, args: Sequence[str], numerics: Numerics = "pinned") -> None:
    """`python -m module *args` in a child process with the recipe's environment (native: one
    thread, this machine's kernels).

    The child inherits stdout/stderr (progress bars show); a failure raises with its exit code.
    """
    cmd = [sys.executable, "-m", module, *args]
    env = pinned_env() if numerics == "pinned" else _native_env()
    result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pinned training failed (exit {result.returncode}): {' '.join(cmd)}")


def _native_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

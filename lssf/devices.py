"""Device selection: the GPU when there is one, the CPU always works."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from threadpoolctl import threadpool_limits

from lssf.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def pick_device(device: str | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when torch sees it, else the CPU; ``cpu``/``cuda[:N]`` as named."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)}")
    return torch.device(device)


@contextlib.contextmanager
def one_thread_ops() -> Iterator[None]:
    """Torch ops and numpy's BLAS on one thread each for the duration; the counts are restored.

    The callers run their own threads: one thread per op keeps each result's bits independent
    of how many run at once, and many small ops on two OpenMP threads wait at a barrier per
    call (measured 40x slower than one thread on the 2-core machine under load).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(saved)

"""Device selection: the GPU when there is one, the CPU always works."""

from __future__ import annotations

import torch

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

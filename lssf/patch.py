"""The safety patch: per target tensor ``U' (d_out, r)`` and ``C = U'^T delta (r, d_in)``.

Computed once per aligned model, applied to any of its fine-tunes in one streaming pass.
On disk: ``manifest.json`` and ``factors.safetensors`` (float32, ``NAME.U`` and ``NAME.C``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from lssf.checkpoint import Checkpoint
from lssf.config import PatchConfig, format_validation_error
from lssf.errors import CheckpointError
from lssf.sources import SourceRecord

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FACTORS = "factors.safetensors"


class TensorRecord(BaseModel):
    """What the rank rule decided for one target tensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, int]
    rank: int
    entropy_ratio: float  # H_r / H_n
    energy_kept: float  # sum_{i<=r} p_i
    n_nonzero: int  # singular values above s_1 * 1e-12
    top_singular_value: float
    delta_norm: float  # Frobenius norm of the safety vector


class PatchManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    method: str = "lssf"
    lssf_version: str
    config: PatchConfig
    aligned: SourceRecord
    reference: SourceRecord
    tensors: dict[str, TensorRecord]

    @property
    def patch_id(self) -> str:
        """Stable id of (aligned revision, reference revision, parameters)."""
        key = {
            "aligned": [self.aligned.name, self.aligned.revision],
            "reference": [self.reference.name, self.reference.revision],
            "config": self.config.model_dump(mode="json"),
            "format": self.format_version,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def factor_names(tensor: str) -> tuple[str, str]:
    return f"{tensor}.U", f"{tensor}.C"


class SafetyPatch:
    """A patch folder on disk; factors are read lazily, one tensor at a time."""

    def __init__(self, folder: Path, manifest: PatchManifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self._factors: Checkpoint | None = None

    @classmethod
    def load(cls, folder: Path | str) -> SafetyPatch:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{folder} is not a safety patch: {MANIFEST} is missing")
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"unreadable patch manifest {path}: {exc}") from exc
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: patch format_version {version!r} is not supported "
                f"(this lssf reads {FORMAT_VERSION})"
            )
        try:
            manifest = PatchManifest.model_validate(raw)
        except ValidationError as exc:
            raise CheckpointError(format_validation_error(str(path), exc)) from exc
        if not (folder / FACTORS).is_file():
            raise CheckpointError(f"{folder} is not a safety patch: {FACTORS} is missing")
        return cls(folder, manifest)

    @property
    def patch_id(self) -> str:
        return self.manifest.patch_id

    def __enter__(self) -> SafetyPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._factors is not None:
            self._factors.close()
            self._factors = None

    def factors(self, tensor: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U', C)`` of one target tensor, float32."""
        if self._factors is None:
            self._factors = Checkpoint(self.folder)
        u_name, c_name = factor_names(tensor)
        return self._factors.get(u_name), self._factors.get(c_name)

    def ranks(self) -> dict[str, int]:
        return {name: rec.rank for name, rec in self.manifest.tensors.items()}

"""The safety patch: per target tensor ``U' (d_out, r)`` and ``C = U'^T delta (r, d_in)``.

Computed once per aligned model, applied to any of its fine-tunes in one streaming pass.
On disk: ``manifest.json`` and ``factors.safetensors`` (float32, ``NAME.U`` and ``NAME.C``).
The manifest records the factors file's SHA-256 and the patch id covers it, so a patch edited
after extraction is refused on load (or, if its manifest was re-hashed, carries another id).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lssf.checkpoint import Checkpoint, folder_file
from lssf.config import PatchConfig, format_validation_error
from lssf.errors import CheckpointError, PatchIntegrityError
from lssf.sources import SourceRecord
from lssf.st_io import Header, file_sha256, read_header, short

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
    # Basis activation only: ||U_r^T delta||^2 / ||delta||^2, the safety vector's share in span.
    delta_energy_kept: float | None = Field(None, exclude_if=lambda v: v is None)


class CalibrationRecord(BaseModel):
    """What the activation basis ran: which prompts, how many tokens, on which model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: int  # prompts used (the first `calibration_limit` of the file)
    tokens: int  # chat-templated tokens run through the aligned model
    truncated: int  # prompts cut at calibration_max_tokens
    model_revision: str  # the aligned model's revision the forward pass read
    chat_template_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PatchManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    method: str = "lssf"
    lssf_version: str
    config: PatchConfig
    aligned: SourceRecord
    reference: SourceRecord
    tensors: dict[str, TensorRecord]
    factors_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    calibration: CalibrationRecord | None = Field(None, exclude_if=lambda v: v is None)

    @property
    def patch_id(self) -> str:
        """Id of the whole manifest but the tool version: sources, parameters, factors' content
        and every tensor's record, so no edit of a patch keeps its id."""
        key = {
            "aligned": [self.aligned.name, self.aligned.revision],
            "reference": [self.reference.name, self.reference.revision],
            "config": self.config.model_dump(mode="json"),
            "format": self.format_version,
            "factors": self.factors_sha256,
            "tensors": {n: r.model_dump(mode="json") for n, r in self.tensors.items()},
        }
        if self.calibration is not None:  # absent for delta-svd: its ids are unchanged
            key["calibration"] = self.calibration.model_dump(mode="json")
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
        """Read and verify a patch folder: manifest, factors hash, ranks and shapes."""
        folder = Path(folder)
        path = folder_file(folder, MANIFEST)
        if path is None:
            raise CheckpointError(f"{folder} is not a safety patch: {MANIFEST} is missing")
        patch = cls(folder, _read_manifest(path))
        patch.verify()
        return patch

    def verify(self) -> None:
        """Refuse factors that differ from the manifest: content hash, then every shape.

        Raises ``PatchIntegrityError`` naming what differs; run before any work.
        """
        factors = folder_file(self.folder, FACTORS)
        if factors is None:
            raise CheckpointError(f"{self.folder} is not a safety patch: {FACTORS} is missing")
        actual = file_sha256(factors)
        if actual != self.manifest.factors_sha256:
            raise PatchIntegrityError(
                f"{factors} was changed after extraction: its SHA-256 is {actual[:16]}..., the "
                f"manifest records {self.manifest.factors_sha256[:16]}...; re-extract the patch"
            )
        check_factors(read_header(factors), self.manifest)

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
            self._factors = Checkpoint(self.folder, files=[self.folder / FACTORS])
        u_name, c_name = factor_names(tensor)
        return self._factors.get(u_name), self._factors.get(c_name)

    def ranks(self) -> dict[str, int]:
        return {name: rec.rank for name, rec in self.manifest.tensors.items()}


def _read_manifest(path: Path) -> PatchManifest:
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"unreadable patch manifest {path}: not JSON") from exc
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: patch format_version {short(version)} is not supported "
            f"(this lssf reads {FORMAT_VERSION})"
        )
    if "factors_sha256" not in raw:
        raise PatchIntegrityError(
            f"{path} records no factors_sha256, so its factors cannot be verified (made by an "
            "older lssf, or edited); re-extract the patch"
        )
    try:
        return PatchManifest.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(format_validation_error(str(path), exc)) from exc


def check_factors(header: Header, manifest: PatchManifest) -> None:
    """Every manifest tensor has float32 ``U (d_out, r)`` and ``C (r, d_in)``; nothing else."""
    expected: dict[str, tuple[int, int]] = {}
    for name, rec in manifest.tensors.items():
        d_out, d_in = rec.shape
        if not 0 <= rec.rank <= min(d_out, d_in):
            raise PatchIntegrityError(
                f"{header.path}: tensor {name!r} has rank {rec.rank} in the manifest, "
                f"impossible for shape {list(rec.shape)}"
            )
        u_name, c_name = factor_names(name)
        expected |= {u_name: (d_out, rec.rank), c_name: (rec.rank, d_in)}
    extra = sorted(set(header.tensors) - set(expected))
    if extra:
        raise PatchIntegrityError(
            f"{header.path} holds factors the manifest does not list: {short(extra, 200)}"
        )
    for key, shape in expected.items():
        info = header.tensors.get(key)
        if info is None:
            raise PatchIntegrityError(f"{header.path} lacks factor {key!r} of the manifest")
        if info.shape != shape or info.dtype != "F32":
            raise PatchIntegrityError(
                f"{header.path}: factor {key!r} is {info.dtype} {list(info.shape)}, the manifest "
                f"implies F32 {list(shape)} (rank and shape of its tensor)"
            )

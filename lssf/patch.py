"""The safety patch: per target tensor ``U' (d_out, r)`` and ``C = U'^T delta (r, d_in)``.

On disk: ``manifest.json`` and ``factors.safetensors`` (float32 ``NAME.U``, ``NAME.C``) or, from
a distributed extraction (format 2), factor shards listed in the manifest. The manifest records
each factor file's SHA-256, which the patch id covers: an edited patch is refused or gets a new id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from lssf.checkpoint import Checkpoint, folder_file
from lssf.config import PatchConfig, format_validation_error
from lssf.errors import CheckpointError, PatchIntegrityError
from lssf.models import Frozen
from lssf.sources import SourceRecord
from lssf.st_io import Header, file_sha256, read_header, short

FORMAT_VERSION = 1  # one factors.safetensors
SHARDED_FORMAT_VERSION = 2  # factor shards listed in the manifest
FORMAT_VERSIONS = (FORMAT_VERSION, SHARDED_FORMAT_VERSION)
MANIFEST = "manifest.json"
FACTORS = "factors.safetensors"
SHA256 = r"^[0-9a-f]{64}$"


class TensorRecord(Frozen):
    """What the rank rule decided for one target tensor."""

    shape: tuple[int, int]
    rank: int
    entropy_ratio: float  # H_r / H_n
    energy_kept: float  # sum_{i<=r} p_i
    n_nonzero: int  # singular values above s_1 * 1e-12
    top_singular_value: float
    delta_norm: float  # Frobenius norm of the safety vector
    # Basis activation only: ||U_r^T delta||^2 / ||delta||^2, the safety vector's share in span.
    delta_energy_kept: float | None = Field(None, exclude_if=lambda v: v is None)


class CalibrationRecord(Frozen):
    """What the activation basis ran: which prompts, how many tokens, on which model."""

    file: str
    sha256: str = Field(pattern=SHA256)
    rows: int  # prompts used (the first `calibration_limit` of the file)
    tokens: int  # chat-templated tokens run through the aligned model
    truncated: int  # prompts cut at calibration_max_tokens
    model_revision: str  # the aligned model's revision the forward pass read
    chat_template_sha256: str = Field(pattern=SHA256)
    # Since the answer-token reading (absent from older patches, which counted prompt tokens):
    prompt_tokens: int | None = Field(None, exclude_if=lambda v: v is None)
    answer_tokens: int | None = Field(None, exclude_if=lambda v: v is None)  # the Gram's tokens
    answers_generated: int | None = Field(None, exclude_if=lambda v: v is None)  # not in file
    gram: str | None = Field(None, exclude_if=lambda v: v is None)  # what the Gram counts


class FactorShard(Frozen):
    """One factor file of a sharded patch: its name in the patch folder, hash and targets."""

    file: str
    sha256: str = Field(pattern=SHA256)
    tensors: tuple[str, ...] = Field(min_length=1)

    @field_validator("file")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if any(c in name for c in "/\\\0") or not name.endswith(".safetensors") or name == FACTORS:
            raise ValueError(
                f"shard file {short(name)} must be a *.safetensors file name in the patch "
                f"folder itself (no path, not {FACTORS})"
            )
        return name


class PatchManifest(Frozen):
    format_version: int = FORMAT_VERSION
    method: str = "lssf"
    lssf_version: str
    config: PatchConfig
    aligned: SourceRecord
    reference: SourceRecord
    tensors: dict[str, TensorRecord]
    # Exactly one of the two: factors_sha256 (format 1) or shards (format 2).
    factors_sha256: str | None = Field(None, pattern=SHA256, exclude_if=lambda v: v is None)
    calibration: CalibrationRecord | None = Field(None, exclude_if=lambda v: v is None)
    shards: tuple[FactorShard, ...] | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _one_variant(self) -> PatchManifest:
        sharded = self.format_version == SHARDED_FORMAT_VERSION
        if sharded != (self.shards is not None) or sharded == (self.factors_sha256 is not None):
            raise ValueError(
                f"format_version {self.format_version} needs "
                f"{'shards' if sharded else 'factors_sha256'} and not the other"
            )
        return self

    @property
    def patch_id(self) -> str:
        """Id of the whole manifest but the tool version, so no edit of a patch keeps its id.

        The hash of the manifest's JSON as ``extract`` writes it (``model_dump``), keys sorted,
        ``lssf_version`` left out; a file whose values only validation made so (``3.0`` for
        ``3``) is refused on load (``check_json_types``).
        """
        key = self.model_dump(mode="json", exclude={"lssf_version"})
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def factor_files(self) -> list[FactorShard]:
        """The factor files and what each holds, for either variant."""
        if self.shards is not None:
            return list(self.shards)
        return [
            FactorShard.model_construct(
                file=FACTORS, sha256=self.factors_sha256, tensors=tuple(self.tensors)
            )
        ]


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
        """Refuse factors that differ from the manifest (``PatchIntegrityError``): hash, shapes,
        targets its own include/exclude rule out."""
        check_targets(self.folder, self.manifest)
        check_shards(self.folder, self.manifest)
        for shard in self.manifest.factor_files():
            factors = folder_file(self.folder, shard.file)
            if factors is None:
                raise CheckpointError(
                    f"{self.folder} is not a safety patch: {shard.file} is missing"
                )
            actual = file_sha256(factors)
            if actual != shard.sha256:
                raise PatchIntegrityError(
                    f"{factors} was changed after extraction: its SHA-256 is {actual[:16]}..., "
                    f"the manifest records {shard.sha256[:16]}...; re-extract the patch"
                )
            check_factors(read_header(factors), self.manifest, shard.tensors)

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
            files = [self.folder / s.file for s in self.manifest.factor_files()]
            self._factors = Checkpoint(self.folder, files=files)
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
    if version not in FORMAT_VERSIONS or isinstance(version, bool):
        raise CheckpointError(
            f"{path}: patch format_version {short(version)} is not supported "
            f"(this lssf reads {', '.join(map(str, FORMAT_VERSIONS))})"
        )
    sharded = version == SHARDED_FORMAT_VERSION
    needs, other = ("shards", "factors_sha256") if sharded else ("factors_sha256", "shards")
    if needs not in raw:
        raise PatchIntegrityError(
            f"{path} records no {needs}, so its factors cannot be verified (made by an "
            "older lssf, or edited); re-extract the patch"
        )
    if other in raw:
        raise PatchIntegrityError(
            f"{path}: format_version {version} patches record {needs}, not {other}; "
            "re-extract the patch"
        )
    try:
        manifest = PatchManifest.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(format_validation_error(str(path), exc)) from exc
    check_json_types(path, raw, manifest.model_dump(mode="json"))
    return manifest


def check_json_types(path: Path, raw: object, written: object, where: str = "") -> None:
    """``raw`` (the file) has the JSON types lssf writes (``written``) wherever both have a value:
    a value only validation turned into its type (``"0.85"``, ``3.0``, ``1``) is an edit."""
    if isinstance(raw, dict) and isinstance(written, dict):
        for key in sorted(raw.keys() & written.keys()):
            check_json_types(path, raw[key], written[key], f"{where}.{key}" if where else key)
    elif isinstance(raw, list) and isinstance(written, list) and len(raw) == len(written):
        for i, (r, w) in enumerate(zip(raw, written, strict=True)):
            check_json_types(path, r, w, f"{where}[{i}]")
    elif type(raw) is not type(written):
        raise PatchIntegrityError(
            f"{path}: field {short(where)} is {short(raw)} ({type(raw).__name__}), where lssf "
            f"writes {short(written)} ({type(written).__name__}); the manifest was edited, "
            "re-extract the patch"
        )


def check_targets(folder: Path, manifest: PatchManifest) -> None:
    """Every tensor of the manifest is one its own config's include/exclude selects."""
    config = manifest.config
    for name, record in manifest.tensors.items():
        if not config.is_target(name, len(record.shape)):
            raise PatchIntegrityError(
                f"{folder / MANIFEST}: tensor {short(name)} is not selected by the patch's own "
                f"include {short(list(config.include))} / exclude "
                f"{short(list(config.exclude))}; the manifest was edited, re-extract the patch"
            )


def check_effective(patch: SafetyPatch) -> None:
    """A patch that changes nothing (no tensor, or rank 0 everywhere) is refused."""
    ranks = patch.ranks()
    if not any(rank > 0 for rank in ranks.values()):
        raise PatchIntegrityError(
            f"safety patch {patch.folder} has rank 0 for all of its {len(ranks)} tensor(s): "
            "applying it would change nothing (were aligned and reference the same model?)"
        )


def check_shards(folder: Path, manifest: PatchManifest) -> None:
    """The manifest lists every target in exactly one factor file, and nothing else."""
    where: dict[str, str] = {}
    files = [s.file for s in manifest.factor_files()]
    if len(set(files)) != len(files):
        raise PatchIntegrityError(f"{folder / MANIFEST} lists a shard file twice: {files}")
    for shard in manifest.factor_files():
        for name in shard.tensors:
            if name in where:
                raise PatchIntegrityError(
                    f"{folder / MANIFEST}: tensor {name!r} is in shards {where[name]} and "
                    f"{shard.file}; each target must be in exactly one"
                )
            where[name] = shard.file
    unknown = sorted(set(where) - set(manifest.tensors))
    if unknown:
        raise PatchIntegrityError(
            f"{folder / MANIFEST}: its shards hold factors the manifest does not list: "
            f"{short(unknown, 200)}"
        )
    missing = sorted(set(manifest.tensors) - set(where))
    if missing:
        raise PatchIntegrityError(
            f"{folder / MANIFEST}: no shard holds tensor(s) {short(missing, 200)}"
        )


def check_factors(header: Header, manifest: PatchManifest, names: tuple[str, ...]) -> None:
    """The file holds float32 ``U (d_out, r)``, ``C (r, d_in)`` of each of ``names``, only."""
    expected: dict[str, tuple[int, int]] = {}
    for name in names:
        rec = manifest.tensors[name]
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

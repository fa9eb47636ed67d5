"""Distributed extraction: the factors of a subset of the targets into one shard, then one patch."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field, ValidationError

from lssf._version import __version__
from lssf.checkpoint import Checkpoint
from lssf.config import PatchConfig, format_validation_error
from lssf.devices import pick_device
from lssf.errors import CheckpointError, ConfigError, OutputExistsError, PatchIntegrityError
from lssf.extract import delta_patch, patch_provenance, target_names
from lssf.models import Frozen
from lssf.outputs import PROVENANCE, atomic_folder, write_json
from lssf.patch import (
    FACTORS,
    MANIFEST,
    SHA256,
    SHARDED_FORMAT_VERSION,
    FactorShard,
    PatchManifest,
    SafetyPatch,
    TensorRecord,
    factor_names,
)
from lssf.sources import SourceRecord, content_files, resolve_source, with_hashes
from lssf.st_io import AppendingWriter, file_sha256

log = logging.getLogger(__name__)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def group_by_layer(targets: list[str], layers_per_group: int = 1) -> list[list[str]]:
    """Targets in groups of ``layers_per_group`` decoder layers; those outside any form one more."""
    if layers_per_group < 1:
        raise ConfigError(f"layers_per_group must be at least 1, not {layers_per_group}")
    groups: dict[int, list[str]] = {}
    for name in targets:
        m = _LAYER.search(name)
        key = int(m.group(1)) // layers_per_group if m else -1
        groups.setdefault(key, []).append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k < 0, k))]


class ShardRecord(Frozen):
    """What one ``extract_shard`` read and wrote; kept beside the shard as ``FILE.json``."""

    lssf_version: str
    config: PatchConfig
    aligned: SourceRecord  # as resolved, without hashes (assembly hashes the sources once)
    reference: SourceRecord
    # "aligned/FILE" or "reference/FILE" -> "size:mtime_ns" of each weight file read, so
    # assembly refuses sources rewritten while the shards were extracted.
    inputs: dict[str, str]
    tensors: dict[str, TensorRecord] = Field(min_length=1)
    sha256: str = Field(pattern=SHA256)


def shard_record_path(shard: Path) -> Path:
    """Where the record of the factor shard ``shard`` lives: ``shard`` plus ``.json``."""
    return shard.with_name(shard.name + ".json")


def _fingerprint(a_ckpt: Checkpoint, r_ckpt: Checkpoint) -> dict[str, str]:
    out = {}
    for role, ckpt in (("aligned", a_ckpt), ("reference", r_ckpt)):
        for f in ckpt.files:
            st = os.stat(f)
            out[f"{role}/{f.name}"] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


def _same_source(a: SourceRecord, b: SourceRecord) -> bool:
    return (a.kind, a.repo_id, a.revision, a.path) == (b.kind, b.repo_id, b.revision, b.path)


def _shard_targets(targets: list[str], tensors: Sequence[str], aligned: Path) -> list[str]:
    """``tensors`` in the checkpoint's order (the order ``extract`` writes them), checked."""
    dup = sorted({t for t in tensors if list(tensors).count(t) > 1})
    unknown = sorted(set(tensors) - set(targets))
    if not tensors or dup or unknown:
        why = f"duplicated {dup}" if dup else f"not targets of {aligned}: {unknown[:5]}"
        raise ConfigError(f"a shard needs distinct target tensors; {why if tensors else 'none'}")
    return sorted(tensors, key=targets.index)


def extract_shard(
    aligned: str | Path,
    reference: str | Path,
    out: str | Path,
    tensors: Sequence[str],
    config: PatchConfig | None = None,
    *,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    workers: int | None = None,
) -> ShardRecord:
    """The factors of ``tensors``, as ``extract`` computes them, in ``out`` and ``out.json``."""
    config = config or PatchConfig()
    if config.basis != "delta-svd":
        raise ConfigError(
            f"basis {config.basis!r} cannot be extracted in shards (it runs the model's forward "
            "layer by layer); use extract(), or basis 'delta-svd'"
        )
    out = Path(out).absolute()
    if not overwrite and (out.exists() or shard_record_path(out).exists()):
        raise OutputExistsError(f"{out} exists; pass overwrite=True to replace it")
    dev = pick_device(device)
    a_dir, a_rec = resolve_source(aligned)
    r_dir, r_rec = resolve_source(reference)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with Checkpoint(a_dir) as a_ckpt, Checkpoint(r_dir) as r_ckpt:
            names = _shard_targets(target_names(a_ckpt, r_ckpt, config), tensors, a_dir)
            writer = AppendingWriter(tmp)

            def write(name: str, u: torch.Tensor, c: torch.Tensor) -> None:
                for key, t in zip(factor_names(name), (u, c), strict=True):
                    writer.write(key, t)

            records = delta_patch(a_ckpt, r_ckpt, names, config, dev, write, progress, workers)
            writer.close()
            inputs = _fingerprint(a_ckpt, r_ckpt)
        record = ShardRecord(
            lssf_version=__version__,
            config=config,
            aligned=a_rec,
            reference=r_rec,
            inputs=inputs,
            tensors=records,
            sha256=file_sha256(tmp),
        )
        os.replace(tmp, out)  # the data first: its record, written last, marks it complete
        write_json(shard_record_path(out), record.model_dump(mode="json"))
    finally:
        tmp.unlink(missing_ok=True)
    log.info("shard %s: %d tensors", out.name, len(records))
    return record


def read_shard_record(shard: Path) -> ShardRecord:
    """The validated record beside ``shard``; a ``CheckpointError`` naming the file if not."""
    path = shard_record_path(Path(shard))
    if not Path(shard).is_file():
        raise CheckpointError(f"factor shard {shard} does not exist")
    try:
        return ShardRecord.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"shard record {path} is unreadable: {exc.strerror}") from exc
    except ValidationError as exc:
        raise CheckpointError(format_validation_error(str(path), exc)) from exc


def _check_shards(
    shards: list[tuple[Path, ShardRecord]],
    targets: list[str],
    config: PatchConfig,
    sources: tuple[SourceRecord, SourceRecord],
    inputs: dict[str, str],
) -> dict[str, TensorRecord]:
    """Records in ``targets``' order, once each target is in one unchanged shard of these inputs."""
    where: dict[str, Path] = {}
    for path, rec in shards:
        differs = [
            what
            for what, bad in (
                ("lssf_version", rec.lssf_version != __version__),
                ("config", rec.config != config),
                ("aligned source", not _same_source(rec.aligned, sources[0])),
                ("reference source", not _same_source(rec.reference, sources[1])),
                ("source files (rewritten since)", rec.inputs != inputs),
            )
            if bad
        ]
        if differs:
            raise PatchIntegrityError(f"shard {path} differs from this assembly in {differs}")
        actual = file_sha256(path)
        if actual != rec.sha256:
            raise PatchIntegrityError(
                f"shard {path} was changed after extraction: its SHA-256 is {actual[:16]}..., "
                f"its record says {rec.sha256[:16]}..."
            )
        for name in rec.tensors:
            if name in where:
                raise PatchIntegrityError(f"tensor {name!r} is in both {where[name]} and {path}")
            where[name] = path
    missing = [t for t in targets if t not in where]
    unknown = sorted(set(where) - set(targets))
    if missing or unknown:
        raise PatchIntegrityError(
            f"shards must hold every target exactly once: missing {missing[:5]} "
            f"({len(missing)}), not targets {unknown[:5]}"
        )
    records = {n: r for _, rec in shards for n, r in rec.tensors.items()}
    return {t: records[t] for t in targets}


def _write_factors(
    tmp: Path, shards: list[tuple[Path, ShardRecord]], targets: list[str], consolidate: bool
) -> dict[str, object]:
    """Shards copied in (manifest ``shards``), or merged into one file in ``extract``'s order."""
    if consolidate:
        files = [p for p, _ in shards]
        writer = AppendingWriter(tmp / FACTORS)
        with Checkpoint(files[0].parent, files=files) as ckpt:
            for key in (k for t in targets for k in factor_names(t)):
                writer.write(key, ckpt.get(key))
        writer.close()
        return {"factors_sha256": file_sha256(tmp / FACTORS)}
    out = []
    for k, (path, rec) in enumerate(shards, 1):
        name = f"factors-{k:05d}-of-{len(shards):05d}.safetensors"
        shutil.copyfile(path, tmp / name)
        out.append(FactorShard(file=name, sha256=rec.sha256, tensors=tuple(rec.tensors)))
    return {"format_version": SHARDED_FORMAT_VERSION, "shards": tuple(out)}


def assemble_patch(
    shards: Sequence[str | Path],
    aligned: str | Path,
    reference: str | Path,
    out: str | Path,
    config: PatchConfig | None = None,
    *,
    consolidate: bool = False,
    overwrite: bool = False,
) -> SafetyPatch:
    """One patch folder from the shards of ``extract_shard``, verified before it is published.

    Sharded (manifest format 2) by default; ``consolidate`` merges the factors into one
    ``factors.safetensors``, giving the very patch (same bytes, same id) ``extract`` writes.
    """
    config = config or PatchConfig()
    recs = [(Path(p).absolute(), read_shard_record(Path(p))) for p in shards]
    a_dir, a_rec = resolve_source(aligned)
    r_dir, r_rec = resolve_source(reference)
    with Checkpoint(a_dir) as a_ckpt, Checkpoint(r_dir) as r_ckpt:
        targets = target_names(a_ckpt, r_ckpt, config)
        records = _check_shards(recs, targets, config, (a_rec, r_rec), _fingerprint(a_ckpt, r_ckpt))
    recs.sort(key=lambda pr: targets.index(next(iter(pr[1].tensors))))
    inputs_dirs = [a_dir, r_dir, *{p.parent for p, _ in recs}]
    with atomic_folder(Path(out), overwrite=overwrite, inputs=inputs_dirs) as tmp:
        manifest = PatchManifest(
            lssf_version=__version__,
            config=config,
            aligned=with_hashes(a_rec, content_files(a_dir)),
            reference=with_hashes(r_rec, content_files(r_dir)),
            tensors=records,
            **_write_factors(tmp, recs, targets, consolidate),
        )
        SafetyPatch(tmp, manifest).verify()  # shapes and hashes, before anything is published
        write_json(tmp / MANIFEST, manifest.model_dump(mode="json"))
        write_json(tmp / PROVENANCE, patch_provenance(manifest))
    log.info(
        "patch %s: %d tensors from %d shards, in %s",
        manifest.patch_id,
        len(records),
        len(recs),
        out,
    )
    return SafetyPatch.load(Path(out))

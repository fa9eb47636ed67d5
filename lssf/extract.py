"""Extract a safety patch from an aligned/reference pair, streaming one tensor at a time.

``extract`` writes a whole patch in one process. For a distributed extraction,
``extract_shard`` computes the factors of a named subset of the targets into one shard file
(each matrix decomposed by the same code as in ``extract``), and ``assemble_patch`` checks the
shards against each other and the sources and writes one patch folder that lists them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from lssf._version import __version__
from lssf.checkpoint import Checkpoint
from lssf.config import PatchConfig, format_validation_error
from lssf.devices import pick_device
from lssf.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteError,
    OutputExistsError,
    PatchIntegrityError,
    ShapeMismatchError,
)
from lssf.lowrank import top_subspace
from lssf.methods import get_rank_rule
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
from lssf.sources import SIDE_FILES, SourceRecord, hash_files, resolve_source, with_hashes
from lssf.spectral import (
    direction_weights,
    energy_kept,
    entropy_ratio,
    safety_factors,
    safety_spectrum,
)
from lssf.st_io import AppendingWriter, file_sha256, is_finite

log = logging.getLogger(__name__)


def _matched(ckpt: Checkpoint, config: PatchConfig) -> list[str]:
    """Tensors the patterns select; only floating-point ones are targets, others are skipped."""
    matched = [n for n in ckpt.names() if config.is_target(n, len(ckpt.info(n).shape))]
    skipped = [n for n in matched if not ckpt.is_float(n)]
    if skipped:
        log.warning(
            "%d tensor(s) match the target patterns but are not floating-point; not targeted: %s",
            len(skipped),
            ", ".join(f"{n} ({ckpt.info(n).dtype})" for n in skipped[:5]),
        )
    return [n for n in matched if ckpt.is_float(n)]


def target_names(aligned: Checkpoint, reference: Checkpoint, config: PatchConfig) -> list[str]:
    """Target tensors of the aligned model, checked against the reference before any maths."""
    targets = _matched(aligned, config)
    if not targets:
        raise ShapeMismatchError(
            f"no tensor of {aligned.folder} matches include={list(config.include)} "
            f"exclude={list(config.exclude)}"
        )
    for name in targets:
        if name not in reference:
            raise ShapeMismatchError(
                f"tensor {name!r} is in the aligned model {aligned.folder} "
                f"but not in the reference {reference.folder}"
            )
        a, r = aligned.info(name).shape, reference.info(name).shape
        if a != r:
            raise ShapeMismatchError(
                f"tensor {name!r} has shape {list(a)} in the aligned model but {list(r)} "
                "in the reference"
            )
    return targets


def list_targets(
    aligned: str | Path, reference: str | Path, config: PatchConfig | None = None
) -> list[str]:
    """The target tensors ``extract`` would patch, in its order (headers only, no maths)."""
    config = config or PatchConfig()
    a_dir, _ = resolve_source(aligned)
    r_dir, _ = resolve_source(reference)
    with Checkpoint(a_dir) as a_ckpt, Checkpoint(r_dir) as r_ckpt:
        return target_names(a_ckpt, r_ckpt, config)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def group_by_layer(targets: list[str], layers_per_group: int = 1) -> list[list[str]]:
    """Targets split into groups of ``layers_per_group`` consecutive decoder layers, in order;
    tensors outside any ``layers.N.`` block form one more group."""
    if layers_per_group < 1:
        raise ConfigError(f"layers_per_group must be at least 1, not {layers_per_group}")
    groups: dict[int, list[str]] = {}
    for name in targets:
        m = _LAYER.search(name)
        key = int(m.group(1)) // layers_per_group if m else -1
        groups.setdefault(key, []).append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k < 0, k))]


def safety_delta(name: str, aligned: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``delta = W_aligned - W_reference`` in float32 whatever the stored dtype."""
    for label, t in (("aligned", aligned), ("reference", reference)):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"tensor {name!r} of the {label} model has {bad} NaN/Inf values")
    delta = aligned.float() - reference.float()
    if not torch.isfinite(delta).all():
        raise NonFiniteError(f"safety vector of tensor {name!r} overflows float32 (NaN/Inf)")
    return delta


def patch_tensor(
    delta: torch.Tensor, config: PatchConfig
) -> tuple[torch.Tensor, torch.Tensor, TensorRecord]:
    """Steps 2-4 of LSSF for one safety vector ``delta: (d_out, d_in)``.

    Returns ``U': (d_out, r)``, ``C: (r, d_in)`` (float32, CPU) and the tensor's record.
    Ranked rules take the certified low-rank path (``lssf/lowrank.py``: same ranks, same
    projection to 1e-6, full SVD whenever that is not certain); ``full`` needs every vector.
    """
    rule = get_rank_rule(config.rank_rule)

    def select(s: torch.Tensor) -> int:
        rank = rule.select(s, config.eta)
        return rank if config.max_rank is None else min(rank, config.max_rank)

    if config.rank_rule == "full":
        spec = safety_spectrum(delta)
        rank = select(spec.s)
    else:
        found = top_subspace(delta, select)
        spec, rank = found.spectrum, found.rank
        if found.fallback:
            log.debug("%s delta: full SVD (%s)", list(delta.shape), found.fallback)
    weights = direction_weights(spec.s, rank, config.weight_top)
    u, c = safety_factors(delta, spec.u[:, :rank], weights)
    record = TensorRecord(
        shape=tuple(delta.shape),
        rank=rank,
        entropy_ratio=entropy_ratio(spec.s, rank),
        energy_kept=energy_kept(spec.s, rank),
        n_nonzero=int(spec.s.numel()),
        top_singular_value=float(spec.s[0]) if spec.s.numel() else 0.0,
        delta_norm=float(torch.linalg.vector_norm(delta.double())),
    )
    if not (is_finite(u) and is_finite(c)):
        raise NonFiniteError(
            f"safety factors of a {list(delta.shape)} tensor overflow float32 (NaN/Inf); "
            f"weight_top={config.weight_top} is too large"
        )
    return u.cpu(), c.cpu(), record


def extract(
    aligned: str | Path,
    reference: str | Path,
    out: str | Path,
    config: PatchConfig | None = None,
    *,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> SafetyPatch:
    """Compute the safety patch of ``aligned`` against ``reference`` and write it to ``out``.

    Reads both checkpoints lazily; peak memory is a few copies of the largest target tensor
    (basis ``activation``: plus the calibration hidden states and one layer's weights and
    Grams, see ``lssf/llama_forward.py``).
    """
    config = config or PatchConfig()
    dev = pick_device(device)
    a_dir, a_rec = resolve_source(aligned)
    r_dir, r_rec = resolve_source(reference)
    calibration = None
    with Checkpoint(a_dir) as a_ckpt, Checkpoint(r_dir) as r_ckpt:
        targets = target_names(a_ckpt, r_ckpt, config)
        with atomic_folder(Path(out), overwrite=overwrite, inputs=[a_dir, r_dir]) as tmp:
            writer = AppendingWriter(tmp / FACTORS)

            def write(name: str, u: torch.Tensor, c: torch.Tensor) -> None:
                u_name, c_name = factor_names(name)
                writer.write(u_name, u)
                writer.write(c_name, c)

            if config.basis == "activation":  # imported only when used: the forward pass
                from lssf.activation_extract import activation_patch

                records, calibration = activation_patch(
                    a_ckpt, r_ckpt, targets, config, dev, write, progress
                )
            else:
                records = _delta_patch(a_ckpt, r_ckpt, targets, config, dev, write, progress)
            writer.close()
            aligned_rec = with_hashes(a_rec, _hashes(a_ckpt))
            if calibration is not None:
                calibration = calibration.model_copy(
                    update={"model_revision": aligned_rec.revision}
                )
            manifest = PatchManifest(
                lssf_version=__version__,
                config=config,
                aligned=aligned_rec,
                reference=with_hashes(r_rec, _hashes(r_ckpt)),
                tensors=records,
                factors_sha256=file_sha256(tmp / FACTORS),
                calibration=calibration,
            )
            write_json(tmp / MANIFEST, manifest.model_dump(mode="json"))
            write_json(tmp / PROVENANCE, patch_provenance(manifest))
    log.info("patch %s: %d tensors, written to %s", manifest.patch_id, len(records), out)
    return SafetyPatch.load(Path(out))


def _delta_patch(
    a_ckpt: Checkpoint,
    r_ckpt: Checkpoint,
    targets: list[str],
    config: PatchConfig,
    dev: torch.device,
    write: Callable[[str, torch.Tensor, torch.Tensor], None],
    progress: bool,
) -> dict[str, TensorRecord]:
    """The delta-svd basis: each target's factors from its safety vector alone."""
    records: dict[str, TensorRecord] = {}
    bar = tqdm(total=len(targets), desc="extract", unit="tensor", disable=not progress)
    for name, a_t, r_t in _prefetched(a_ckpt, r_ckpt, targets):
        delta = safety_delta(name, a_t.to(dev), r_t.to(dev))
        try:
            u, c, records[name] = patch_tensor(delta, config)
        except NonFiniteError as exc:
            raise NonFiniteError(f"tensor {name!r}: {exc}") from exc
        write(name, u, c)
        bar.set_postfix(rank=records[name].rank)
        bar.update()
    bar.close()
    return records


def _prefetched(
    a_ckpt: Checkpoint, r_ckpt: Checkpoint, names: list[str]
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Each name with its aligned and reference tensors; the next pair is read in a thread
    while the caller computes (pread releases the GIL), so reads overlap the SVD."""

    def read(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return a_ckpt.get(name), r_ckpt.get(name)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lssf-read") as pool:
        pending = pool.submit(read, names[0]) if names else None
        for k, name in enumerate(names):
            pair = pending.result()
            if k + 1 < len(names):
                pending = pool.submit(read, names[k + 1])
            yield name, *pair


def patch_provenance(manifest: PatchManifest) -> dict[str, object]:
    """Marks the folder as lssf's (``--overwrite`` replaces only such folders)."""
    prov: dict[str, object] = {
        "tool": "lssf",
        "lssf_version": __version__,
        "kind": "patch",
        "patch_id": manifest.patch_id,
    }
    if manifest.shards is None:
        prov["factors_sha256"] = manifest.factors_sha256
    else:
        prov["shards"] = {s.file: s.sha256 for s in manifest.shards}
    return prov


def _hashes(ckpt: Checkpoint) -> dict[str, str]:
    files = {f.name: file_sha256(f) for f in ckpt.files}
    files.update(hash_files(ckpt.folder, list(SIDE_FILES)))
    return files


# -- distributed extraction: one shard per group of targets, then one patch ------------------


class ShardRecord(BaseModel):
    """What one ``extract_shard`` read and wrote; kept beside the shard as ``FILE.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
    wanted = set(tensors)
    return [t for t in targets if t in wanted]


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
) -> ShardRecord:
    """The factors of the targets ``tensors`` into the safetensors file ``out`` (plus its
    ``out.json`` record), exactly as ``extract`` computes them. Basis delta-svd only: the
    activation basis runs the whole model forward, layer after layer."""
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

            records = _delta_patch(a_ckpt, r_ckpt, names, config, dev, write, progress)
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
        side = tmp.with_name(tmp.name + ".json")
        write_json(side, record.model_dump(mode="json"))
        os.replace(tmp, out)  # the data first: its record, written last, marks it complete
        os.replace(side, shard_record_path(out))
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".json")):
            leftover.unlink(missing_ok=True)
    log.info("shard %s: %d tensors", out.name, len(records))
    return record


def read_shard_record(shard: Path) -> ShardRecord:
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
    """Every target in exactly one shard, each made from these sources and this config, its
    file unchanged; returns the tensor records in the checkpoint's order."""
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
    """Shards copied in (manifest ``shards``) or merged into one file in ``extract``'s order
    (``factors_sha256``: then the folder is byte for byte what ``extract`` writes)."""
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
        out.append(
            FactorShard(file=name, sha256=file_sha256(tmp / name), tensors=tuple(rec.tensors))
        )
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
        inputs = _fingerprint(a_ckpt, r_ckpt)
        records = _check_shards(recs, targets, config, (a_rec, r_rec), inputs)
        sources = with_hashes(a_rec, _hashes(a_ckpt)), with_hashes(r_rec, _hashes(r_ckpt))
    first = {t: k for k, t in enumerate(targets)}
    recs.sort(key=lambda pr: first[next(iter(pr[1].tensors))])
    inputs_dirs = [a_dir, r_dir, *{p.parent for p, _ in recs}]
    with atomic_folder(Path(out), overwrite=overwrite, inputs=inputs_dirs) as tmp:
        manifest = PatchManifest(
            lssf_version=__version__,
            config=config,
            aligned=sources[0],
            reference=sources[1],
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

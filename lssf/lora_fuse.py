"""Fuse a safety patch into a LoRA fine-tune: resolve its base, check lineage, write the result.

The result is either a merged model folder (the base's shards, each tensor merged with the
adapter and then fused, one at a time) or one PEFT adapter holding both the fine-tune and the
patch (``lssf.adapter_out``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lssf.checkpoint import Checkpoint, folder_file
from lssf.errors import CheckpointError, PatchMismatchError
from lssf.fuse import FuseResult, _copy_side_files, _write_shard, check_compatible, side_files
from lssf.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, MergedView, check_against_base
from lssf.outputs import atomic_folder, write_json
from lssf.patch import SafetyPatch
from lssf.provenance import PROVENANCE, model_card, provenance
from lssf.sources import SIDE_FILES, SourceRecord, hash_files, resolve_source, with_hashes
from lssf.st_io import file_sha256

log = logging.getLogger(__name__)


def resolve_base(adapter: LoraAdapter, aligned: str | Path | None) -> tuple[Path, SourceRecord]:
    """The adapter's base: ``aligned`` when given, else its config's base_model_name_or_path."""
    declared = adapter.base
    ref = str(aligned) if aligned is not None else declared
    if ref is None:
        raise CheckpointError(
            f"{adapter.folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path is "
            f"{adapter.config.get('base_model_name_or_path')!r}); pass the aligned model with "
            "aligned= (--aligned PATH_OR_ID)"
        )
    if aligned is not None and declared is not None and declared != ref:
        log.warning("adapter %s declares base %r; using %r as asked", adapter.folder, declared, ref)
    try:
        return resolve_source(ref)
    except CheckpointError as exc:
        where = "aligned=" if aligned is not None else f"{ADAPTER_CONFIG} base_model_name_or_path"
        raise CheckpointError(
            f"base model {ref!r} of adapter {adapter.folder} (from {where}) cannot be resolved: "
            f"{exc}. Pass the aligned model with --aligned PATH_OR_ID"
        ) from exc


def check_base_lineage(
    base_dir: Path, base: SourceRecord, aligned: SourceRecord, force: bool
) -> None:
    """Refuse an adapter whose base is not the aligned model the patch was built from."""
    names = {aligned.ref, aligned.name, aligned.path, aligned.ref.split("@")[0]}
    same = (
        base.ref in names
        or base.name in names
        or str(base_dir) == aligned.path
        or _same_weights(base_dir, aligned)
    )
    if same:
        return
    msg = (
        f"the adapter's base model {base.ref!r} is not the aligned model {aligned.name!r} "
        "the patch was built from"
    )
    if not force:
        raise PatchMismatchError(msg + "; pass force=True (--force) to fuse anyway")
    log.warning("%s; fusing anyway (forced)", msg)


def _same_weights(base_dir: Path, aligned: SourceRecord) -> bool:
    """A copy of the aligned model under another name: same weight files, same hashes."""
    weights = {n: h for n, h in aligned.files.items() if n.endswith(".safetensors")}
    try:
        found = {n: folder_file(base_dir, n) for n in weights}
    except CheckpointError:
        return False
    if not weights or any(p is None for p in found.values()):
        return False
    log.info("comparing %s with the patch's aligned model by content", base_dir)
    return all(file_sha256(found[n]) == h for n, h in weights.items())


def adapter_record(adapter: LoraAdapter, record: SourceRecord) -> SourceRecord:
    """The adapter's source record with the hashes of its config and weights."""
    return with_hashes(record, hash_files(adapter.folder, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]))


def fuse_adapter(
    folder: Path,
    record: SourceRecord,
    patch: SafetyPatch,
    out: Path,
    *,
    alpha: float,
    aligned: str | Path | None,
    output_format: str,
    force: bool,
    device: torch.device,
    overwrite: bool,
    progress: bool,
) -> FuseResult:
    """``fuse`` for a LoRA fine-tune: a merged model folder, or one combined PEFT adapter."""
    with LoraAdapter(folder) as adapter:
        base_dir, base_rec = resolve_base(adapter, aligned)
        with Checkpoint(base_dir) as base, patch:
            check_against_base(adapter, base)
            check_compatible(base, patch)
            check_base_lineage(base_dir, base_rec, patch.manifest.aligned, force)
            side_files(base_dir)  # refuse escaping side files before any work
            record = adapter_record(adapter, record)
            if output_format == "adapter":
                from lssf.adapter_out import write_combined_adapter

                n_fused = write_combined_adapter(
                    adapter,
                    base,
                    patch,
                    Path(out),
                    alpha=alpha,
                    finetuned=record,
                    base_record=base_rec,
                    overwrite=overwrite,
                    progress=progress,
                )
            else:
                view = MergedView(base, adapter, device)
                n_fused = _write_merged(
                    view, base_rec, record, patch, Path(out), alpha, overwrite, progress
                )
    log.info("fused %d tensors (alpha=%s, %s) into %s", n_fused, alpha, output_format, out)
    return FuseResult(Path(out), patch.patch_id, alpha, record, n_fused)


def _write_merged(
    view: MergedView,
    base_rec: SourceRecord,
    record: SourceRecord,
    patch: SafetyPatch,
    out: Path,
    alpha: float,
    overwrite: bool,
    progress: bool,
) -> int:
    """The merged fine-tune with the patch fused in, shard by shard like the base."""
    total = sum(i.nbytes for h in view.headers for i in h.tensors.values())
    inputs = [view.folder, view.adapter.folder, patch.folder]
    with atomic_folder(out, overwrite=overwrite, inputs=inputs) as tmp:
        bar = tqdm(total=total, desc="fuse", unit="B", unit_scale=True, disable=not progress)
        n_fused = sum(
            _write_shard(view, h, tmp / h.path.name, patch, alpha, view.device, bar)
            for h in view.headers
        )
        bar.close()
        _copy_side_files(view.folder, tmp)
        files = dict(view.sha256) | hash_files(view.folder, list(SIDE_FILES))
        prov = provenance(patch.manifest, record, alpha, patch.patch_id)
        prov["sources"]["finetuned_base"] = with_hashes(base_rec, files).model_dump(mode="json")
        prov["finetuned_kind"] = "lora"
        write_json(tmp / PROVENANCE, prov)
        (tmp / "README.md").write_text(model_card(patch.manifest, record, alpha))
    return n_fused

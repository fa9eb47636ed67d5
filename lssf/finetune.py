"""The inputs of a fuse, checked together: the patch and the fine-tune as a ``TensorSource``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lssf.checkpoint import Checkpoint, TensorSource, check_tensors
from lssf.devices import pick_device
from lssf.errors import CheckpointError, PatchMismatchError
from lssf.lora import ADAPTER_CONFIG, LoraAdapter, MergedView, is_adapter
from lssf.models import SourceRecord
from lssf.patch import SafetyPatch
from lssf.provenance import declared_base
from lssf.sources import ModelRef, content_files, hash_files, resolve_source, with_hashes

log = logging.getLogger(__name__)


def open_patch(patch: SafetyPatch | str | Path) -> SafetyPatch:
    """A patch folder loaded and verified, or a loaded patch verified again (files may change)."""
    if isinstance(patch, SafetyPatch):
        patch.verify()
        return patch
    return SafetyPatch.load(Path(patch))


def open_finetune(
    ref: str | Path | ModelRef,
    *,
    aligned: str | Path | ModelRef | None = None,
    device: str | torch.device | None = None,
) -> TensorSource:
    """A fine-tune's tensors: the model folder, or a LoRA adapter merged onto its base.

    The base of an adapter is ``aligned`` when given, else the one its config declares;
    ``device`` is where LoRA factors are merged. Use the result as a context manager.
    """
    folder, record = resolve_source(ref)
    if not is_adapter(folder):
        if aligned is not None:
            log.warning("aligned=%s is only used for adapter fine-tunes; ignored", aligned)
        return Checkpoint(folder, record=record)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    adapter = LoraAdapter(folder)
    try:
        base_dir, base_record = resolve_base(adapter, aligned)
        base = Checkpoint(base_dir, record=base_record)
        record = with_hashes(record, content_files(folder))
        return MergedView(base, adapter, dev, record=record)
    except BaseException:
        adapter.__exit__()
        raise


def resolve_base(
    adapter: LoraAdapter, aligned: str | Path | ModelRef | None
) -> tuple[Path, SourceRecord]:
    """The adapter's base: ``aligned`` when given, else its config's (at its revision, if any)."""
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


def check_compatible(ft: TensorSource, patch: SafetyPatch) -> None:
    """Every patched tensor must exist in the fine-tune with the shape the patch was built for."""
    wanted = {name: rec.shape for name, rec in patch.manifest.tensors.items()}
    check_tensors(ft, wanted, floats=set(wanted), wanted_by=f"the patch {patch.folder}")


def check_lineage(ft: TensorSource, aligned: SourceRecord, force: bool) -> None:
    """Refuse a fine-tune whose base is not the aligned model the patch was built from.

    A LoRA's base is the folder it is merged onto; a full fine-tune's is what its model card
    (or PEFT config) declares, a Hub id or a path relative to the model's folder.
    """
    names = {aligned.ref, aligned.name, aligned.path}  # name: the Hub id without @revision
    if isinstance(ft, MergedView):
        base, base_dir = ft.base.record, ft.base.folder
        declared = base.ref if base is not None else str(base_dir)
        where = f"the adapter {ft.adapter.folder}"
        found = {declared, str(base_dir)} | ({base.name} if base else set())
        ok = bool(found & names) or _same_weights(base_dir, aligned)
    else:
        declared, where = declared_base(ft.folder), str(ft.folder)
        if declared is None:
            log.warning("%s declares no base model; cannot check it against the patch", where)
            return
        ok = declared in names or _same_folder(ft.folder, declared, aligned.path)
    if ok:
        return
    msg = (
        f"{where} declares base model {declared!r}, which is not the aligned model "
        f"{aligned.name!r} the patch was built from"
    )
    if not force:
        raise PatchMismatchError(msg + "; pass force=True (--force) to fuse anyway")
    log.warning("%s; fusing anyway (forced)", msg)


def _same_folder(folder: Path, declared: str, path: str) -> bool:
    """A path in the card, relative to the model's folder (not to where lssf runs), is ``path``."""
    try:
        local = folder / Path(declared).expanduser()
        return local.exists() and str(local.resolve()) == path
    except (OSError, ValueError):  # not a usable path (too long, NUL): a Hub id or nonsense
        return False


def _same_weights(base_dir: Path, aligned: SourceRecord) -> bool:
    """A copy of the aligned model under another name: same weight files, same hashes."""
    weights = {n: h for n, h in aligned.files.items() if n.endswith(".safetensors")}
    if not weights:
        return False
    log.info("comparing %s with the patch's aligned model by content", base_dir)
    try:
        return all(hash_files(base_dir, [n]) == {n: h} for n, h in weights.items())
    except CheckpointError:
        return False


def finetune_sources(ft: TensorSource, streamed: dict[str, str] | None) -> dict[str, SourceRecord]:
    """The records ``finetuned`` (and a LoRA's ``finetuned_base``) of an ``open_finetune`` result.

    The folder streamed (the model, or a LoRA's base) gets ``streamed``, the hashes of its files.
    """
    base = ft.base if isinstance(ft, MergedView) else None
    streamed_record = (ft if base is None else base).record
    if ft.record is None or streamed_record is None:
        raise CheckpointError(f"{ft.folder} was not opened by open_finetune (no source record)")
    if streamed:
        streamed_record = with_hashes(streamed_record, streamed)
    if base is None:
        return {"finetuned": streamed_record}
    return {"finetuned": ft.record, "finetuned_base": streamed_record}

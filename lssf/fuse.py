"""Fuse a safety patch into a fine-tuned model in one streaming pass.

Every output shard mirrors an input shard: the same tensors in the same order, the targeted
ones replaced by ``W_ft + alpha * U' C`` and the rest copied bit for bit.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lssf.checkpoint import INDEX_NAME, Checkpoint, folder_file
from lssf.config import check_alpha
from lssf.devices import pick_device
from lssf.errors import ConfigError, NonFiniteError, PatchMismatchError, ShapeMismatchError
from lssf.lora import is_adapter
from lssf.outputs import atomic_folder, write_json
from lssf.patch import SafetyPatch
from lssf.provenance import PROVENANCE, declared_base, model_card, provenance
from lssf.sources import SIDE_FILES, SourceRecord, hash_files, resolve_source, with_hashes
from lssf.spectral import fused_weight
from lssf.st_io import PlannedWriter, TensorSpec, is_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FuseResult:
    out: Path
    patch_id: str
    alpha: float
    finetuned: SourceRecord
    n_fused: int


def check_compatible(ft: Checkpoint, patch: SafetyPatch) -> None:
    """Every patched tensor must exist in the fine-tune with the shape the patch was built for."""
    for name, rec in patch.manifest.tensors.items():
        if name not in ft:
            raise ShapeMismatchError(f"patch tensor {name!r} is missing from {ft.folder}")
        shape = ft.info(name).shape
        if tuple(shape) != tuple(rec.shape):
            raise ShapeMismatchError(
                f"tensor {name!r} has shape {list(shape)} in the fine-tuned model but "
                f"{list(rec.shape)} in the patch"
            )
        if not ft.info(name).torch_dtype.is_floating_point:
            raise ShapeMismatchError(
                f"tensor {name!r} is {ft.info(name).dtype} in the fine-tuned model {ft.folder}; "
                "only floating-point tensors can be fused"
            )


def check_lineage(folder: Path, patch: SafetyPatch, force: bool) -> None:
    """Refuse a patch built from another aligned model than the one the fine-tune declares."""
    aligned = patch.manifest.aligned
    declared = declared_base(folder)
    if declared is None:
        log.warning("%s declares no base model; cannot check it against the patch", folder)
        return
    known = {aligned.ref, aligned.name, aligned.path, aligned.ref.split("@")[0]}
    same = declared in known or _same_folder(folder, declared, aligned.path)
    if same:
        return
    msg = (
        f"{folder} declares base model {declared!r}, but the patch was built from "
        f"aligned model {aligned.name!r}"
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


def side_files(folder: Path) -> dict[str, Path]:
    """The index, config and tokenizer files present; any that leaves the folder is refused."""
    found = {name: folder_file(folder, name) for name in (INDEX_NAME, *SIDE_FILES)}
    return {name: path for name, path in found.items() if path is not None}


def _copy_side_files(src: Path, dst: Path) -> None:
    """Content only: the output's files get the umask's permissions, not the source's."""
    for name, path in side_files(src).items():
        shutil.copyfile(path, dst / name)


def _write_shard(ft, header, dst, patch, alpha, dev, bar) -> int:
    specs = [
        TensorSpec(i.name, i.torch_dtype, i.shape)
        for i in sorted(header.tensors.values(), key=lambda t: t.start)
    ]
    writer = PlannedWriter(dst, specs, header.metadata or {"format": "pt"})
    fused = 0
    for info, tensor in ft.iter_file(header):
        if info.name in patch.manifest.tensors:
            u, c = patch.factors(info.name)
            tensor = fused_weight(tensor.to(dev), u.to(dev), c.to(dev), alpha).cpu()
            if not is_finite(tensor):
                raise NonFiniteError(f"fused tensor {info.name!r} has NaN/Inf values")
            fused += 1
        writer.write(info.name, tensor)
        bar.update(info.nbytes)
    writer.close()
    return fused


def fuse(
    finetuned: str | Path,
    patch: SafetyPatch | str | Path,
    out: str | Path,
    *,
    alpha: float = 1.0,
    force: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    aligned: str | Path | None = None,
    format: str = "model",
) -> FuseResult:
    """Write ``finetuned`` with ``alpha * P' @ delta`` added to every patched tensor to ``out``.

    ``out`` is a complete transformers model folder, written atomically. ``finetuned`` may be a
    PEFT LoRA adapter on ``aligned`` (default: the base its config declares); then
    ``format="adapter"`` writes one PEFT adapter holding the fine-tune and the patch instead.
    """
    alpha = check_alpha(alpha)
    if isinstance(patch, SafetyPatch):
        patch.verify()  # its files may have changed since it was loaded
    else:
        patch = SafetyPatch.load(Path(patch))
    dev = pick_device(device)
    if format not in ("model", "adapter"):
        raise ConfigError(f"format must be 'model' or 'adapter', got {format!r}")
    folder, record = resolve_source(finetuned)
    if is_adapter(folder):
        from lssf.lora_fuse import fuse_adapter

        return fuse_adapter(
            folder, record, patch, Path(out), alpha=alpha, aligned=aligned,
            output_format=format, force=force, device=dev, overwrite=overwrite, progress=progress,
        )  # fmt: skip
    if format == "adapter":
        raise ConfigError(
            f"format='adapter' (--format adapter) is not applicable to {folder}: it is a full "
            "fine-tune, not a LoRA adapter. Use format='model', or `lssf patch export-adapter` "
            "for the safety patch alone as an adapter"
        )
    if aligned is not None:
        log.warning("aligned=%s is only used for adapter fine-tunes; ignored", aligned)
    with Checkpoint(folder) as ft, patch:
        check_compatible(ft, patch)
        check_lineage(folder, patch, force)
        side_files(folder)  # refuse escaping side files before any work
        total = sum(i.nbytes for h in ft.headers for i in h.tensors.values())
        inputs = [folder, patch.folder]
        with atomic_folder(Path(out), overwrite=overwrite, inputs=inputs) as tmp:
            bar = tqdm(total=total, desc="fuse", unit="B", unit_scale=True, disable=not progress)
            n_fused = sum(
                _write_shard(ft, h, tmp / h.path.name, patch, alpha, dev, bar) for h in ft.headers
            )
            bar.close()
            _copy_side_files(folder, tmp)
            files = dict(ft.sha256)
            files.update(hash_files(folder, list(SIDE_FILES)))
            record = with_hashes(record, files)
            prov = provenance(patch.manifest, record, alpha, patch.patch_id)
            write_json(tmp / PROVENANCE, prov)
            (tmp / "README.md").write_text(model_card(patch.manifest, record, alpha))
    log.info("fused %d tensors (alpha=%s) into %s", n_fused, alpha, out)
    return FuseResult(Path(out), patch.patch_id, alpha, record, n_fused)

"""Fuse a safety patch into a fine-tuned model in one streaming pass.

Every output shard mirrors an input shard: the same tensors in the same order, the targeted
ones replaced by ``W_ft + alpha * U' C`` and the rest copied bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lssf.checkpoint import INDEX_NAME, Checkpoint, folder_file
from lssf.config import check_alpha
from lssf.devices import pick_device
from lssf.errors import ConfigError, NonFiniteError, PatchMismatchError, ShapeMismatchError
from lssf.lora import is_adapter
from lssf.outputs import atomic_folder, write_json
from lssf.patch import SafetyPatch
from lssf.pipeline import BufferPool, WriteBehind
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


# fp32 rows per block: the block stays in the core's cache from the cast to the rounding.
BLOCK_BYTES = 1 << 19
# No block has fewer rows (unless the tensor has): MKL multiplies 1-3 rows with other kernels
# (gemv), whose roundings differ from the whole-matrix product; 4 rows and more matched it
# bit for bit here (tests/test_fuse_speed_paths.py checks it on every machine).
MIN_ROWS = 16
# Targets at least this big are computed in two halves on two threads.
SPLIT_BYTES = 1 << 21
# How a plain checkpoint's shards are read: "read" (``pread`` into recycled buffers: the bytes
# hashed are the bytes fused) or "map" (views of the mapped file, no copy). Measured on 1 GB
# (benchmarks/fuse_speed.py, 2026-12-01): "read" 3.3 s, "map" 3.6 s quiet; under load the
# other way round (5.3 s, 4.6 s). No clear win, so the simpler guarantee is the default.
READ_MODE = "read"


def fused_rows(
    w: torch.Tensor, u: torch.Tensor, c: torch.Tensor, alpha: float, out: torch.Tensor
) -> torch.Tensor:
    """``out = W + alpha * U' C`` in float32, rounded to ``out``'s dtype, a block of rows at a time.

    w, out: (d_out, d_in); u: (d_out, r); c: (r, d_in). The same operations per element as
    ``spectral.fused_weight`` (cast, one ``addmm`` with beta 1, round), so the same bytes; the
    block keeps the float32 temporaries in cache instead of two full-size float32 passes.
    """
    m = w.shape[0]
    rows = max(MIN_ROWS, BLOCK_BYTES // (4 * max(1, w.shape[1])))
    buf = torch.empty(min(m, rows + MIN_ROWS), w.shape[1], dtype=torch.float32)
    i = 0
    while i < m:
        j = m if m - (i + rows) < MIN_ROWS else i + rows  # the last block takes the remainder
        block = buf[: j - i]
        block.copy_(w[i:j])
        block.addmm_(u[i:j], c, alpha=alpha)
        out[i:j].copy_(block)
        i = j
    return out


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """torch ops on one thread each while fusing; the pipeline's threads share the cores.

    Many small ``addmm`` on two OpenMP threads wait at a barrier per call: measured 40x slower
    than one thread on this 2-core machine under load. The previous setting is restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Fuser:
    """Fused values of the patch's targets, each checked finite (the writer skips them)."""

    def __init__(self, patch: SafetyPatch, alpha: float, dev: torch.device, pool, buffers, release):
        """``buffers``/``release``: where outputs come from and inputs go (None: fuse's own)."""
        self.patch, self.alpha, self.dev, self.pool = patch, alpha, dev, pool
        self.buffers: BufferPool | None = buffers
        self.release = release

    def __call__(self, name: str, w: torch.Tensor) -> torch.Tensor:
        u, c = self.patch.factors(name)
        if u.shape[1] == 0 or self.alpha == 0.0:
            out = w  # W + 0: the input bytes themselves
        elif self.dev.type == "cpu" and w.dim() == 2:
            out = self._rows(w, u.float(), c.float())
        else:
            out = fused_weight(w.to(self.dev), u.to(self.dev), c.to(self.dev), self.alpha).cpu()
        if out is not w and self.release is not None:
            self.release(w)  # the input, no longer needed
        if not is_finite(out):
            raise NonFiniteError(f"fused tensor {name!r} has NaN/Inf values")
        return out

    def _rows(self, w: torch.Tensor, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Row blocks, the second half on the pool's thread: rows are independent."""
        out = self.buffers.empty_like(w) if self.buffers is not None else torch.empty_like(w)
        half = w.shape[0] // 2
        small = w.numel() * w.element_size() < SPLIT_BYTES or half < MIN_ROWS
        if self.pool is None or small:
            return fused_rows(w, u, c, self.alpha, out)
        other = self.pool.submit(fused_rows, w[half:], u[half:], c, self.alpha, out[half:])
        fused_rows(w[:half], u[:half], c, self.alpha, out[:half])
        other.result()
        return out


def _write_shard(ft, header, dst, patch, alpha, dev, bar) -> int:
    """One output shard: read ahead (and hash) in a thread, fuse here, write in another thread."""
    infos = sorted(header.tensors.values(), key=lambda t: t.start)
    specs = [TensorSpec(i.name, i.torch_dtype, i.shape) for i in infos]
    targets = [i.name for i in infos if i.name in patch.manifest.tensors]
    writer = PlannedWriter(dst, specs, header.metadata or {"format": "pt"}, checked=targets)
    # Only a plain checkpoint's tensors are fuse's own to map and recycle (not a LoRA view's).
    own = isinstance(ft, Checkpoint)
    mode = READ_MODE if own else "read"
    with contextlib.ExitStack() as stack:
        buffers = BufferPool() if own else None
        mapped = stack.enter_context(ft.mapped(header)) if mode == "map" else None
        tensors = ft.iter_file(header, pool=buffers, mapped=mapped) if own else ft.iter_file(header)
        stack.enter_context(contextlib.closing(tensors))  # stops the reader thread on failure

        def release(t: torch.Tensor) -> None:
            if buffers is not None and not (mapped is not None and mapped.give(t)):
                buffers.give(t)

        stack.enter_context(single_threaded_ops())
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="lssf-fuse"))
        out = stack.enter_context(WriteBehind(writer, release=release))
        fused = _Fuser(patch, alpha, dev, pool, buffers, release if own else None)
        for info, tensor in tensors:
            if info.name in patch.manifest.tensors:
                tensor = fused(info.name, tensor)
            out.write(info.name, tensor)
            bar.update(info.nbytes)
    return len(targets)


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

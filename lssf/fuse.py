"""Fuse a safety patch into a fine-tuned model in one streaming pass.

Every output shard mirrors an input shard: the same tensors in the same order, the targeted
ones replaced by ``W_ft + alpha * U' C`` and the rest copied bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from lssf import hashcache
from lssf.adapter_out import write_combined_adapter
from lssf.checkpoint import INDEX_NAME, Checkpoint, TensorSource, folder_file
from lssf.config import check_alpha
from lssf.devices import one_thread_ops, pick_device
from lssf.errors import CheckpointError, ConfigError, NonFiniteError
from lssf.finetune import (
    check_compatible,
    check_lineage,
    finetune_sources,
    open_finetune,
    open_patch,
)
from lssf.lora import MergedView
from lssf.outputs import atomic_folder
from lssf.patch import SafetyPatch, check_effective
from lssf.pipeline import BufferPool, MappedFile, give_back
from lssf.provenance import Provenance, model_card, write_outputs
from lssf.sources import SIDE_FILES, ModelRef, SourceRecord, hash_files
from lssf.spectral import fused_weight
from lssf.st_io import Header, MappedWriter, TensorSpec, check_finite, is_finite

log = logging.getLogger(__name__)

OutputFormat = Literal["model", "adapter"]


@dataclass(frozen=True)
class FuseResult:
    """Where the fused output went, from what, and how many tensors the patch changed."""

    out: Path
    patch_id: str
    alpha: float
    finetuned: SourceRecord
    n_fused: int


def side_files(folder: Path) -> dict[str, Path]:
    """The index, config and tokenizer files present; any that leaves the folder is refused."""
    found = {name: folder_file(folder, name) for name in (INDEX_NAME, *SIDE_FILES)}
    return {name: path for name, path in found.items() if path is not None}


# fp32 bytes per row block: the block stays in cache from the cast to the rounding, and MKL
# packs ``C`` once per block (smaller blocks measured slower; the result is the same at any).
BLOCK_BYTES = 1 << 22
# No block has fewer rows (unless the tensor has): MKL multiplies 1-3 rows with other kernels
# (gemv), whose roundings differ from the whole-matrix product; 4 rows and more matched it
# bit for bit here (tests/test_fuse_speed_paths.py checks it on every machine).
MIN_ROWS = 16
# Targets at least this big are computed in two halves on two threads.
SPLIT_BYTES = 1 << 21
# How the fine-tune's shards (a LoRA's: its base's) are read: "read" (``pread`` into recycled
# buffers: the bytes hashed are the bytes fused), "map" (views of the mapped file, no copy), or
# "auto": "map" where the shard's digest came from ``lssf.hashcache`` (nothing to hash; the
# mapping checks the file's stat data on exit), else "read" (docs/benchmarks.md: timings).
READ_MODE = "auto"


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


@dataclass(frozen=True)
class _Fuser:
    """Writes each patch target's fused value into its slot of the output, checked finite."""

    alpha: float
    dev: torch.device
    pool: ThreadPoolExecutor

    def __call__(self, name: str, w: torch.Tensor, out: torch.Tensor, factors: Future) -> None:
        """``out = w + alpha * U' C`` for patch tensor ``name``; ``factors``: its ``(U', C)``."""
        u, c = factors.result()
        if u.shape[1] == 0 or self.alpha == 0.0:
            out.copy_(w)  # W + 0: the input bytes themselves
        elif self.dev.type == "cpu" and w.dim() == 2:
            self._rows(w, u.float(), c.float(), out)
        else:
            out.copy_(fused_weight(w.to(self.dev), u.to(self.dev), c.to(self.dev), self.alpha))
        if not is_finite(out):
            raise NonFiniteError(f"fused tensor {name!r} has NaN/Inf values")

    def _rows(self, w: torch.Tensor, u: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> None:
        """Row blocks, the second half on the pool's thread: rows are independent."""
        half = w.shape[0] // 2
        if w.numel() * w.element_size() < SPLIT_BYTES or half < MIN_ROWS:
            fused_rows(w, u, c, self.alpha, out)
            return
        other = self.pool.submit(fused_rows, w[half:], u[half:], c, self.alpha, out[half:])
        fused_rows(w[:half], u[:half], c, self.alpha, out[:half])
        other.result()


def _copy(
    name: str,
    src: torch.Tensor,
    slot: torch.Tensor,
    out: MappedWriter,
    mapped: MappedFile | None,
    dst: Path,
) -> None:
    """``slot = src`` a block at a time, each block checked finite while in cache.

    The pages of both leave the resident set as they are used, so a large tensor (an
    embedding) is never resident whole.
    """
    flat, into = src.reshape(-1), slot.view(-1)
    size = src.element_size()
    step = max(1, BLOCK_BYTES // size)
    for i in range(0, flat.numel(), step):
        part = into[i : i + step]
        part.copy_(flat[i : i + step])
        check_finite(name, part, dst)
        lo, hi = i * size, (i + part.numel()) * size
        out.drop(name, lo, hi)
        if mapped is not None:
            mapped.drop(src, lo, hi)


def _stream_digest(
    ft: TensorSource, header: Header
) -> tuple[Checkpoint, hashcache.Snapshot | None, str | None]:
    """The checkpoint that reads ``header``'s file, its snapshot and the cached digest (or None).

    A hit counts only if the descriptor the bytes come through is the file the cache entry is
    for (same inode and device): a file replaced since it was opened is hashed as it is read.
    """
    ck = ft.base if isinstance(ft, MergedView) else ft
    try:
        snap = hashcache.snapshot(header.path)
    except OSError:
        return ck, None, None
    hit = hashcache.cached_sha256(header.path)
    st = ck.fstat(header)
    if (st.st_ino, st.st_dev) != (snap.stat.st_ino, snap.stat.st_dev):
        return ck, None, None
    return ck, snap, hit


def _settle_digest(
    ck: Checkpoint, header: Header, snap: hashcache.Snapshot | None, hit: str | None
) -> None:
    """After streaming: the digest just computed stored, or the cached one recorded.

    A hit is used only if the file kept its stat data while it was read (else the bytes read
    may not be the bytes once hashed: the run fails, as for a mapped file).
    """
    name = header.path.name
    if hit is None:
        if snap is not None:
            hashcache.store_sha256(header.path, ck.sha256[name], snap)
        return
    if snap is None or not hashcache.unchanged(snap):
        raise CheckpointError(f"{header.path} changed while it was being read; run again")
    ck.sha256[name] = hit


def _write_shard(
    ft: TensorSource,
    header: Header,
    dst: Path,
    patch: SafetyPatch,
    alpha: float,
    dev: torch.device,
    bar: tqdm,
    buffers: BufferPool,
) -> int:
    """One output shard, filled in place: read ahead (and hash) in a thread, fuse into the file.

    ``buffers`` is shared by every shard of a run: later shards reuse the first one's memory.

    The input's digest (a LoRA's: its base shard's) comes from ``lssf.hashcache`` when its stat
    data is unchanged since it was last hashed; only then is hashing skipped.
    """
    infos = sorted(header.tensors.values(), key=lambda t: t.start)
    specs = [TensorSpec(i.name, i.torch_dtype, i.shape) for i in infos]
    targets = [i.name for i in infos if i.name in patch.manifest.tensors]
    ck, snap, hit = _stream_digest(ft, header)
    with contextlib.ExitStack() as stack:
        mapped: MappedFile | None = None
        if READ_MODE == "map" or (READ_MODE == "auto" and hit is not None):
            mapped = stack.enter_context(ft.mapped(header))
        tensors = ft.iter_file(header, pool=buffers, mapped=mapped, hash=hit is None)
        stack.enter_context(contextlib.closing(tensors))  # stops the reader thread on failure
        stack.enter_context(one_thread_ops())  # the pipeline's threads share the cores
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="lssf-fuse"))
        out = stack.enter_context(MappedWriter(dst, specs, header.metadata or {"format": "pt"}))
        fused = _Fuser(alpha, dev, pool)
        loader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="lssf-factors"))
        # Each target's factors are read one target ahead, off the computing thread.
        factors = {n: loader.submit(patch.factors, n) for n in targets[:2]}
        queued = iter(targets[2:])
        for info, tensor in tensors:
            slot = out.slot(info.name)
            if (tensor.dtype, tensor.shape) != (slot.dtype, slot.shape):
                raise CheckpointError(
                    f"{dst}: expected {info.name!r} {slot.dtype} {tuple(slot.shape)}, "
                    f"got {tensor.dtype} {tuple(tensor.shape)}"
                )
            if info.name in patch.manifest.tensors:
                if (following := next(queued, None)) is not None:
                    factors[following] = loader.submit(patch.factors, following)
                fused(info.name, tensor, slot, factors.pop(info.name))
            else:
                _copy(info.name, tensor, slot, out, mapped, dst)
            del slot
            give_back(tensor, buffers, mapped)
            out.done(info.name)
            bar.update(info.nbytes)
    _settle_digest(ck, header, snap, hit)
    return len(targets)


def _write_model(
    ft: TensorSource,
    patch: SafetyPatch,
    out: Path,
    alpha: float,
    dev: torch.device,
    *,
    overwrite: bool,
    progress: bool,
) -> tuple[int, Provenance]:
    """The fine-tune with the patch fused in, shard by shard like its (base) model folder."""
    sides = side_files(ft.folder)  # refuse escaping side files before any work
    total = sum(i.nbytes for h in ft.headers for i in h.tensors.values())
    with atomic_folder(out, overwrite=overwrite, inputs=[*ft.folders, patch.folder]) as tmp:
        with tqdm(total=total, desc="fuse", unit="B", unit_scale=True, disable=not progress) as bar:
            buffers = BufferPool()
            n_fused = sum(
                _write_shard(ft, h, tmp / h.path.name, patch, alpha, dev, bar, buffers)
                for h in ft.headers
            )
        for name, path in sides.items():  # content only: the umask's permissions, not theirs
            shutil.copyfile(path, tmp / name)
        streamed = dict(ft.sha256) | hash_files(ft.folder, list(SIDE_FILES))
        prov = Provenance.build(patch.manifest, alpha, finetune_sources(ft, streamed))
        write_outputs(tmp, prov, model_card(prov, patch.manifest, None))
    return n_fused, prov


def fuse(
    finetuned: str | Path | ModelRef,
    patch: SafetyPatch | str | Path,
    out: str | Path,
    *,
    alpha: float = 1.0,
    force: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    aligned: str | Path | ModelRef | None = None,
    output_format: OutputFormat = "model",
) -> FuseResult:
    """Write ``finetuned`` with ``alpha * P' @ delta`` added to every patched tensor to ``out``.

    ``out`` is a complete transformers model folder, written atomically. ``finetuned`` may be a
    PEFT LoRA adapter on ``aligned`` (default: the base its config declares); then
    ``output_format="adapter"`` writes one PEFT adapter holding the fine-tune and the patch.
    """
    alpha = check_alpha(alpha)
    patch = open_patch(patch)
    check_effective(patch)
    dev = pick_device(device)
    if output_format not in ("model", "adapter"):
        raise ConfigError(f"format must be 'model' or 'adapter', got {output_format!r}")
    with open_finetune(finetuned, aligned=aligned, device=dev) as ft, patch:
        if output_format == "adapter" and not isinstance(ft, MergedView):
            raise ConfigError(
                f"format='adapter' (--format adapter) is not applicable to {ft.folder}: it is a "
                "full fine-tune, not a LoRA adapter. Use format='model', or `lssf patch "
                "export-adapter` for the safety patch alone as an adapter"
            )
        check_compatible(ft, patch)
        check_lineage(ft, patch.manifest.aligned, force)
        if isinstance(ft, MergedView) and output_format == "adapter":
            n_fused, prov = write_combined_adapter(
                ft, patch, Path(out), alpha=alpha, overwrite=overwrite, progress=progress
            )
        else:
            n_fused, prov = _write_model(
                ft, patch, Path(out), alpha, dev, overwrite=overwrite, progress=progress
            )
    log.info("fused %d tensors (alpha=%s, %s) into %s", n_fused, alpha, output_format, out)
    return FuseResult(Path(out), patch.patch_id, alpha, prov.sources["finetuned"], n_fused)

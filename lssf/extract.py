"""Extract a safety patch from an aligned/reference pair, streaming one tensor at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lssf._version import __version__
from lssf.checkpoint import Checkpoint
from lssf.config import PatchConfig
from lssf.devices import pick_device
from lssf.errors import NonFiniteError, ShapeMismatchError
from lssf.lowrank import top_subspace
from lssf.methods import get_rank_rule
from lssf.outputs import PROVENANCE, atomic_folder, write_json
from lssf.patch import FACTORS, MANIFEST, PatchManifest, SafetyPatch, TensorRecord, factor_names
from lssf.sources import SIDE_FILES, hash_files, resolve_source, with_hashes
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
    return {
        "tool": "lssf",
        "lssf_version": __version__,
        "kind": "patch",
        "patch_id": manifest.patch_id,
        "factors_sha256": manifest.factors_sha256,
    }


def _hashes(ckpt: Checkpoint) -> dict[str, str]:
    files = {f.name: file_sha256(f) for f in ckpt.files}
    files.update(hash_files(ckpt.folder, list(SIDE_FILES)))
    return files

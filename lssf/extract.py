"""Extract a safety patch from an aligned/reference pair, streaming a few tensors at a time.

``extract`` writes a whole patch in one process. Independent target matrices are decomposed
concurrently by ``workers`` threads (each torch op on one intra-op thread; torch's linear
algebra releases the GIL), while a reader thread reads the next pairs ahead within a byte
budget. Each matrix is decomposed by the same single-threaded code and the factors are written
in the checkpoint's order, so the patch (bytes and id) is the same for any worker count. The
distributed variant (one shard per group of targets, then one patch) is in ``lssf.shards``.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lssf._version import __version__
from lssf.checkpoint import Checkpoint
from lssf.config import PatchConfig
from lssf.devices import one_thread_ops, pick_device
from lssf.errors import (
    ConfigError,
    LssfError,
    NonFiniteError,
    PatchIntegrityError,
    ShapeMismatchError,
)
from lssf.lowrank import patch_tensor, safety_delta
from lssf.outputs import PROVENANCE, atomic_folder, write_json
from lssf.patch import FACTORS, MANIFEST, PatchManifest, SafetyPatch, TensorRecord, factor_names
from lssf.sources import content_files, resolve_source, with_hashes
from lssf.st_io import AppendingWriter, file_sha256

log = logging.getLogger(__name__)

__all__ = ["extract", "list_targets", "patch_tensor", "safety_delta", "target_names"]

# Threads decomposing matrices at once: one per usable CPU, at most this many (each holds a
# few copies of its matrix). ``LSSF_EXTRACT_WORKERS`` overrides the default.
MAX_WORKERS = 8
WORKERS_ENV = "LSSF_EXTRACT_WORKERS"
# Estimated bytes of the matrices read ahead or in work at once (at least one always runs):
# a constant, so peak memory does not grow with the model.
READ_AHEAD_BYTES = 3 * 2**30


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


def extract(
    aligned: str | Path,
    reference: str | Path,
    out: str | Path,
    config: PatchConfig | None = None,
    *,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> SafetyPatch:
    """Compute the safety patch of ``aligned`` against ``reference`` and write it to ``out``.

    Reads both checkpoints lazily; peak memory is a few copies of the largest target tensor
    (basis ``activation``: plus the calibration hidden states and one layer's weights and
    Grams, see ``lssf/llama_forward.py``). ``workers``: threads decomposing matrices at once
    (default :func:`default_workers`); the output does not depend on it.
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
                for key, t in zip(factor_names(name), (u, c), strict=True):
                    writer.write(key, t)

            if config.basis == "activation":  # imported only when used: the forward pass
                from lssf.activation_extract import activation_patch

                records, calibration = activation_patch(
                    a_ckpt, r_ckpt, targets, config, dev, write, progress
                )
            else:
                records = delta_patch(
                    a_ckpt, r_ckpt, targets, config, dev, write, progress, workers
                )
            writer.close()
            aligned_rec = with_hashes(a_rec, content_files(a_ckpt.folder))
            if calibration is not None:
                calibration = calibration.model_copy(
                    update={"model_revision": aligned_rec.revision}
                )
            manifest = PatchManifest(
                lssf_version=__version__,
                config=config,
                aligned=aligned_rec,
                reference=with_hashes(r_rec, content_files(r_ckpt.folder)),
                tensors=records,
                factors_sha256=file_sha256(tmp / FACTORS),
                calibration=calibration,
            )
            write_json(tmp / MANIFEST, manifest.model_dump(mode="json"))
            write_json(tmp / PROVENANCE, patch_provenance(manifest))
            read_back(tmp, Path(out))  # before it is published: never an unusable patch at out
    log.info("patch %s: %d tensors, written to %s", manifest.patch_id, len(records), out)
    return SafetyPatch.load(Path(out))


def read_back(tmp: Path, out: Path) -> SafetyPatch:
    """Load a patch from the temp folder it was written to, as ``fuse`` will; else refuse it.

    (Names the manifest or the safetensors header cannot carry the same way, e.g. a lone
    surrogate, only show up here.)
    """
    try:
        return SafetyPatch.load(tmp)
    except LssfError as exc:
        why = str(exc).replace(str(tmp), str(out))
        raise PatchIntegrityError(
            f"the patch for {out} does not read back, so nothing was written there: {why}"
        ) from exc


def default_workers(dev: torch.device) -> int:
    """Threads for ``delta_patch``: ``LSSF_EXTRACT_WORKERS``, else one per usable CPU (at most
    ``MAX_WORKERS``); one on an accelerator, whose kernels queue on one device anyway."""
    env = os.environ.get(WORKERS_ENV)
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"{WORKERS_ENV} must be a positive integer, not {env!r}")
        return int(env)
    if dev.type != "cpu":
        return 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(usable or 1, MAX_WORKERS))


def _work_bytes(a_ckpt: Checkpoint, r_ckpt: Checkpoint, name: str) -> int:
    """Estimated peak bytes of one matrix in work: both inputs as stored, the float32 delta,
    its float64 copy (and, past ``GRAM_MAX_SIDE``, a transposed one) and the small Gram."""
    info = a_ckpt.info(name)
    n = math.prod(info.shape)
    side = min(info.shape, default=1)
    return info.nbytes + r_ckpt.info(name).nbytes + 20 * n + 8 * side * side


def delta_patch(
    a_ckpt: Checkpoint,
    r_ckpt: Checkpoint,
    targets: list[str],
    config: PatchConfig,
    dev: torch.device,
    write: Callable[[str, torch.Tensor, torch.Tensor], None],
    progress: bool,
    workers: int | None = None,
) -> dict[str, TensorRecord]:
    """The delta-svd basis: each target's factors from its safety vector alone.

    ``workers`` threads decompose matrices concurrently, one reader thread reads ahead within
    ``READ_AHEAD_BYTES``; ``write`` is called in ``targets``' order from this thread.
    """
    workers = default_workers(dev) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")

    def read(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return a_ckpt.get(name), r_ckpt.get(name)

    def decompose(name: str, pair: Future) -> tuple[torch.Tensor, torch.Tensor, TensorRecord]:
        a_t, r_t = pair.result()
        delta = safety_delta(name, a_t.to(dev), r_t.to(dev))
        del a_t, r_t
        try:
            return patch_tensor(delta, config)
        except NonFiniteError as exc:
            raise NonFiniteError(f"tensor {name!r}: {exc}") from exc

    records: dict[str, TensorRecord] = {}
    bar = tqdm(total=len(targets), desc="extract", unit="tensor", disable=not progress)
    reader = ThreadPoolExecutor(1, thread_name_prefix="lssf-read")
    pool = ThreadPoolExecutor(
        workers, thread_name_prefix="lssf-svd", initializer=torch.set_num_threads, initargs=(1,)
    )
    queue: deque[tuple[str, int, Future]] = deque()
    todo = deque(targets)
    held = 0
    try:
        with one_thread_ops():
            while todo or queue:
                # Up to workers + 2 matrices read or in work, within the byte budget (one
                # always, however large).
                while todo and len(queue) < workers + 2:
                    cost = _work_bytes(a_ckpt, r_ckpt, todo[0])
                    if queue and held + cost > READ_AHEAD_BYTES:
                        break
                    name = todo.popleft()
                    pair = reader.submit(read, name)
                    queue.append((name, cost, pool.submit(decompose, name, pair)))
                    held += cost
                name, cost, job = queue.popleft()
                u, c, records[name] = job.result()
                held -= cost
                write(name, u, c)
                bar.set_postfix(rank=records[name].rank)
                bar.update()
    finally:
        for _, _, job in queue:
            job.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        reader.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return records


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

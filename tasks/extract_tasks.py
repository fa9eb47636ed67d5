"""Prefect tasks of a distributed extraction, each wrapping one ``lssf.extract`` call.

Only paths, tensor names and records travel between tasks, never tensors: a worker reads the
model folders (a shared volume on a cluster) itself and writes its own factor shard.
"""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from lssf import PatchConfig
from lssf.errors import CheckpointError
from lssf.extract import list_targets
from lssf.outputs import check_output
from lssf.shards import assemble_patch, extract_shard, group_by_layer, read_shard_record
from lssf.st_io import file_sha256
from tasks._log import run_logger


def worker_rank() -> int | None:
    """This Dask worker's rank (a LocalCluster names its workers 0..n-1); None elsewhere."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return None
    return int(name) if str(name).isdigit() else None


def worker_device(rank: int | None, n_gpus: int) -> str:
    """One GPU per worker: rank ``i`` gets ``cuda:i`` (modulo the GPUs seen); CPU without."""
    return f"cuda:{(rank or 0) % n_gpus}" if n_gpus > 0 else "cpu"


def _reusable(shard: Path, config: PatchConfig, names: list[str]) -> bool:
    """Whether a previous attempt finished ``shard`` for the same targets and config, intact."""
    try:
        record = read_shard_record(shard)
    except CheckpointError:
        return False
    same = record.config == config and list(record.tensors) == names
    return same and file_sha256(shard) == record.sha256


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards(
    aligned: str,
    reference: str,
    out: str,
    config: PatchConfig,
    layers_per_task: int = 1,
    overwrite: bool = False,
) -> list[list[str]]:
    """Target tensors grouped by decoder layer, ``layers_per_task`` layers to a group; refuses
    an ``out`` it may not write before any work is done."""
    check_output(Path(out).absolute(), overwrite=overwrite, inputs=[Path(aligned), Path(reference)])
    groups = group_by_layer(list_targets(aligned, reference, config), layers_per_task)
    run_logger().info("%d targets in %d groups", sum(map(len, groups)), len(groups))
    return groups


@task(name="extract-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def extract_group(
    aligned: str,
    reference: str,
    shard: str,
    names: list[str],
    config: PatchConfig,
    threads: int = 1,
) -> str:
    """Factors of one group of targets into ``shard``, on this worker's own device; one torch
    thread by default: the same bits as a one-process ``extract`` on one thread."""
    log = run_logger()
    if _reusable(Path(shard), config, names):
        log.info("%s: complete from an earlier attempt", Path(shard).name)
        return shard
    torch.set_num_threads(threads)
    rank = worker_rank()
    device = worker_device(rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    log.info("%s: %d tensors on %s (worker %s)", Path(shard).name, len(names), device, rank)
    # One matrix at a time per worker: the cluster's workers are the parallelism (a pool of
    # matrix threads in every worker would oversubscribe the cores).
    extract_shard(
        aligned, reference, shard, names, config, device=device, overwrite=True, workers=threads
    )
    return shard


@task(name="assemble-patch", cache_policy=NO_CACHE)
def assemble(
    shards: list[str],
    aligned: str,
    reference: str,
    out: str,
    config: PatchConfig,
    consolidate: bool = False,
    overwrite: bool = False,
) -> str:
    """One verified patch folder from the shards; returns its id."""
    patch = assemble_patch(
        shards, aligned, reference, out, config, consolidate=consolidate, overwrite=overwrite
    )
    run_logger().info("patch %s: %d shards assembled into %s", patch.patch_id, len(shards), out)
    return patch.patch_id

"""`extract_distributed`: one safety patch, its SVDs fanned out over a Dask cluster.

One task per group of decoder layers writes a factor shard on a worker; the shards become one
patch folder (with ``consolidate``, the one a single process writes). An existing cluster
(``address="tcp://..."``) must see the model folders and the output's parent at the same paths.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect_dask import DaskTaskRunner

from lssf import PatchConfig
from tasks import extract_tasks as et

DEFAULT_WORKERS = 2


def dask_runner(workers: int = DEFAULT_WORKERS, address: str | None = None) -> DaskTaskRunner:
    """A runner on ``address``, or on a LocalCluster of ``workers`` one-thread processes."""
    if address is not None:
        return DaskTaskRunner(address=address)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    cluster = {
        "n_workers": workers,
        "threads_per_worker": 1,  # one SVD at a time per process: torch runs one thread
        "processes": True,
        "dashboard_address": ":0",  # a free port: never collides with another cluster
    }
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)


def staging_folder(out: str | Path) -> Path:
    """Where the shards are written: beside the output, hidden, kept until assembly succeeds."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.shards")


@flow(name="extract-distributed", task_runner=dask_runner())
def extract_distributed(
    aligned: str,
    reference: str,
    out: str,
    config: PatchConfig | None = None,
    layers_per_task: int = 1,
    consolidate: bool = False,
    overwrite: bool = False,
    threads: int = 1,
) -> dict[str, Any]:
    """Extract the patch of local folders ``aligned`` and ``reference`` into ``out``."""
    config = config or PatchConfig()
    stage = staging_folder(out)
    stage.mkdir(parents=True, exist_ok=True)
    groups = et.plan_shards(aligned, reference, out, config, layers_per_task, overwrite)
    paths = [str(stage / f"group-{k:05d}.safetensors") for k in range(len(groups))]
    futures = et.extract_group.map(aligned, reference, paths, groups, unmapped(config), threads)
    shards = futures.result()
    patch_id = et.assemble(shards, aligned, reference, out, config, consolidate, overwrite)
    shutil.rmtree(stage, ignore_errors=True)
    get_run_logger().info("patch %s from %d shards in %s", patch_id, len(shards), out)
    return {"patch_id": patch_id, "out": str(out), "shards": len(shards)}


def run_distributed(
    aligned: str | Path,
    reference: str | Path,
    out: str | Path,
    config: PatchConfig | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
    address: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``extract_distributed`` on a runner of ``workers`` local processes (or ``address``)."""
    on_dask = extract_distributed.with_options(task_runner=dask_runner(workers, address))
    return on_dask(str(aligned), str(reference), str(out), config, **options)

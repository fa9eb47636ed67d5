"""Distributed extraction: wall time of one patch, one process vs the Dask flow on 1 and 2 workers.

Generates a bf16 ``make_trio`` trio (``--size 1GB``: the 1 GB checkpoint of
``benchmarks/fuse_speed.py``, 34 Llama layers of hidden 1024), then runs, each in a fresh
subprocess and alternating over ``--repeats``: ``lssf.extract`` on one torch thread, and
``flows.extract.run_distributed`` on a LocalCluster of 1 and of 2 one-thread workers. Reported:
the extraction call's wall time (for the flow: cluster start, fan-out, assembly; the Prefect
test server is started before the clock), the whole subprocess, and whether every factor equals
the one-process patch bit for bit. Run on a quiet machine:

    .venv/bin/python benchmarks/distributed_extract.py [--size 1GB] [--repeats 1]

Check that it works (seconds): ``--size tiny``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lssf.synthetic import LlamaShape

SIZES = {
    "tiny": LlamaShape(hidden=64, intermediate=172, layers=4, heads=4, kv_heads=2, vocab=256),
    "1GB": LlamaShape(hidden=1024, intermediate=2816, layers=34, heads=16, kv_heads=16,
                      vocab=32000),
}  # fmt: skip
# workers <= 0: one process, -workers matrix threads (0: one at a time); > 0: Dask workers.
RUNS = {
    "lssf.extract, 1 process": 0,
    "lssf.extract, 1 process, 2 matrix threads": -2,
    "Dask flow, 1 worker": 1,
    "Dask flow, 2 workers": 2,
}


def child(folder: Path, workers: int, out: Path) -> dict[str, float]:
    """One extraction in this process; its wall time in seconds."""
    torch.set_num_threads(1)
    if workers <= 0:
        from lssf import extract

        t0 = time.perf_counter()
        extract(
            folder / "aligned",
            folder / "reference",
            out,
            overwrite=True,
            progress=False,
            workers=max(1, -workers),
        )
        return {"wall_s": time.perf_counter() - t0}
    from prefect.testing.utilities import prefect_test_harness

    from flows.extract import run_distributed

    with prefect_test_harness(server_startup_timeout=None):
        t0 = time.perf_counter()
        run_distributed(folder / "aligned", folder / "reference", out, workers=workers,
                        overwrite=True)  # fmt: skip
        return {"wall_s": time.perf_counter() - t0}


def same_factors(a: Path, b: Path) -> bool:
    from lssf import SafetyPatch

    with SafetyPatch.load(a) as pa, SafetyPatch.load(b) as pb:
        if pa.manifest.tensors != pb.manifest.tensors:
            return False
        return all(
            torch.equal(x.view(torch.int32), y.view(torch.int32))
            for name in pa.manifest.tensors
            for x, y in zip(pa.factors(name), pb.factors(name), strict=True)
        )


def run(folder: Path, workers: int, out: Path) -> tuple[float, float]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env["PREFECT_HOME"] = str(folder / "prefect-home")
    cmd = [sys.executable, __file__, "--child", str(folder), str(workers), str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    whole = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{cmd} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["wall_s"], whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="1GB")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "WORKERS", "OUT"))
    args = parser.parse_args()
    if args.child:
        folder, workers, out = args.child
        print(json.dumps(child(Path(folder), int(workers), Path(out))))
        return
    from lssf.synthetic import make_trio

    with tempfile.TemporaryDirectory(prefix="lssf-distributed-bench-") as tmp:
        folder = Path(tmp)
        make_trio(folder, SIZES[args.size], seed=0, dtype=torch.bfloat16)
        weights = sum(f.stat().st_size for f in (folder / "aligned").glob("*.safetensors"))
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in RUNS}
        for _ in range(args.repeats):
            for name, workers in RUNS.items():
                times[name].append(run(folder, workers, folder / f"patch-{workers}"))
        base = statistics.median(t for t, _ in times["lssf.extract, 1 process"])
        print(f"\n{args.size} bf16 trio ({weights / 1e9:.2f} GB per checkpoint), "
              f"{os.cpu_count()} cores, median of {args.repeats}")  # fmt: skip
        print("| run | extraction wall s | whole process s | vs 1 process | same factors |")
        print("|---|---|---|---|---|")
        for name, workers in RUNS.items():
            wall = statistics.median(t for t, _ in times[name])
            whole = statistics.median(w for _, w in times[name])
            same = same_factors(folder / "patch-0", folder / f"patch-{workers}")
            print(f"| {name} | {wall:.2f} | {whole:.2f} | {wall / base:.2f}x | "
                  f"{'bit-identical' if same else 'DIFFERENT'} |")  # fmt: skip


if __name__ == "__main__":
    main()

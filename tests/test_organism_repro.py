"""Bit-identity of organism training across thread counts, CPU kernels and MKL code paths.

Each build runs as its own `lssf organism build` process with a different caller environment:
what a machine with another CPU or thread count would give it. `build_organism` trains in a
pinned child (`evaluation.organism.repro`), so the weights' sha256 must not differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.organism.build import MANIFEST, file_hashes, read_manifest, shipped_organisms

# A few dozen optimiser steps per stage: enough for rounding differences to compound.
TINY = {
    "base": {"steps": 24, "lr": 3e-3, "warmup_steps": 4, "batch_size": 16},
    "aligned": {"steps": 8, "lr": 1e-4, "warmup_steps": 2, "batch_size": 16},
    "lora_finetune": {"steps": 8, "lr": 3e-4, "warmup_steps": 2, "batch_size": 16},
}
# What other machines look like to torch, MKL and OpenMP.
CALLERS = {
    "1 thread, baseline kernels": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"},
    "2 threads, AVX2 kernels, MKL limited to AVX2": {
        "OMP_NUM_THREADS": "2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    "16 threads, AVX-512 kernels": {"OMP_NUM_THREADS": "16", "ATEN_CPU_CAPABILITY": "avx512"},
}
BUILD = """
import json, sys
from pathlib import Path
from evaluation.organism import OrganismConfig, build_organism
paths = build_organism(0, Path(sys.argv[1]), OrganismConfig.model_validate_json(sys.argv[2]))
"""


@pytest.mark.slow
def test_same_seed_same_bytes_whatever_the_threads_and_kernels(tmp_path: Path) -> None:
    config = json.dumps(TINY)
    procs = {}
    for i, (label, env) in enumerate(CALLERS.items()):
        cmd = [sys.executable, "-c", BUILD, str(tmp_path / f"org{i}"), config]
        caller = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR",)} | env
        procs[label] = subprocess.Popen(cmd, env=caller, stderr=subprocess.PIPE, text=True)
    for label, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{label}: {err[-2000:]}"
    hashes = {label: read_manifest(tmp_path / f"org{i}")["sha256"] for i, label in enumerate(procs)}
    first = next(iter(hashes.values()))
    assert all(stage["model.safetensors"] for stage in first.values())
    for label, digests in hashes.items():
        assert digests == first, f"{label} trained other weights"
    adapters = [file_hashes(tmp_path / f"org{i}" / "finetuned_adapter") for i in range(3)]
    assert adapters[0] and adapters.count(adapters[0]) == 3


@pytest.mark.parametrize("root", shipped_organisms(), ids=lambda p: p.name)
def test_shipped_organisms_match_their_manifest_and_the_current_key(root: Path) -> None:
    """The shipped weights are what the recorded build produced, under today's code."""
    from evaluation.organism import OrganismConfig, repro

    manifest = json.loads((root / MANIFEST).read_text())
    for stage, digests in manifest["sha256"].items():
        assert file_hashes(root / stage) == digests, stage
    config = OrganismConfig.model_validate(manifest["config"])
    if manifest["versions"] != repro.versions():
        pytest.skip(f"shipped for {manifest['versions']}; this run has {repro.versions()}")
    assert config.cache_key(manifest["seed"], repro.versions()) == manifest["cache_key"]

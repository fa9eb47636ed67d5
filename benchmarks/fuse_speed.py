"""`lssf fuse` against the I/O floor on generated bf16 Llama-shaped checkpoints (issue #13).

For each size (0.25 GB and 1 GB; 4 GB with ``--4gb``) it writes a bf16 fine-tune
(``lssf.synthetic.write_checkpoint``, hidden 1024, intermediate 2816, three ~500 MB shards at
1 GB) and a safety patch whose ranks follow a real extraction (``RANKS``), then runs, each in a
fresh process, ``--repeats`` rounds, each in a new seeded order (median wall, max peak RSS):

- I/O floor: ``safetensors.torch.load_file`` + ``save_file`` of every shard (an identical copy)
- casting floor: the same, with every 2-D tensor cast to float32 and back on the way
- fuse, in-process: ``lssf.fuse(...)`` timed after the imports, the input shards' digests in
  the hash cache (``lssf.hashcache``, a private ``LSSF_CACHE_DIR`` filled before timing): what
  every fuse of an unchanged fine-tune after the first costs
- fuse, in-process, ``LSSF_HASH_CACHE=0``: every shard hashed while it is read (a first fuse,
  or strict mode)
- fuse, pread even on a cache hit: ``READ_MODE = "read"`` instead of the default ``"auto"``
  (which maps a shard whose digest is cached)
- sha256 only: ``hashlib`` over the input shards, what hashing alone costs
- fuse, whole process: ``lssf fuse ...`` timed from outside (cache warm), beside the floor's
  whole-process time
- compute only: every target's ``W + alpha U' C`` (``lssf.fuse.fused_rows``) on data in memory,
  what the arithmetic alone costs on this CPU
- with ``--before REV``: the same fuse from lssf at git revision REV (``git archive``)

with the default torch thread count and with one thread (``OMP_NUM_THREADS=1``). Wall and CPU
seconds are both printed: CPU seconds / wall shows how much of the second core a run used.
Peak RSS is ``VmHWM`` of the process (``ru_maxrss`` is inherited over fork+exec).

Run: ``.venv/bin/python benchmarks/fuse_speed.py [--repeats 3] [--4gb] [--before HEAD~1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lssf.synthetic import LlamaShape

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "0.25GB": LlamaShape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16,
                         vocab=16000),
    "1GB": LlamaShape(hidden=1024, intermediate=2816, layers=34, heads=16, kv_heads=16,
                      vocab=32000),
    "4GB": LlamaShape(hidden=2048, intermediate=5632, layers=34, heads=16, kv_heads=16,
                      vocab=32000),
}  # fmt: skip
# Per layer (q, k, v, o, gate, up, down): the ranks `lssf extract` (eta 0.85) chose for the
# 8-layer 0.25 GB `make_trio` bf16 trio (seed 0) on 2026-12-01; layer n uses row n % 8.
RANKS = [
    (5, 4, 4, 46, 6, 6, 6), (5, 4, 5, 5, 224, 6, 6), (6, 5, 4, 5, 7, 7, 7),
    (4, 6, 25, 5, 143, 205, 350), (5, 46, 5, 6, 198, 7, 7), (4, 5, 4, 4, 8, 288, 6),
    (5, 5, 6, 5, 6, 6, 6), (4, 5, 4, 4, 226, 6, 181),
]  # fmt: skip
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip

PRELUDE = """
import json, os, resource, sys, time
t_start = time.perf_counter()
import torch
{imports}
t0, c0 = time.perf_counter(), time.process_time()
"""
EPILOGUE = """
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the parent process.
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss,
                  "import_s": t0 - t_start}))
"""
FLOOR = """
from pathlib import Path
out = Path('{d}/copy'); out.mkdir(exist_ok=True)
for f in sorted(Path('{d}/finetuned').glob('*.safetensors')):
    t = load_file(f)
    {cast}
    save_file(t, out / f.name, metadata={{'format': 'pt'}})
"""
CAST = "t = {{k: v.float().to(v.dtype) if v.dim() == 2 else v for k, v in t.items()}}"
SAFETENSORS = "from safetensors.torch import load_file, save_file"
OPS = {
    "I/O floor": (SAFETENSORS, FLOOR.replace("{cast}", "pass")),
    "casting floor": (SAFETENSORS, FLOOR.replace("{cast}", CAST)),
    "fuse, in-process": (
        "from lssf import fuse",
        "fuse('{d}/finetuned', '{d}/patch', '{d}/fused', overwrite=True, progress=False)",
    ),
    "fuse, in-process, LSSF_HASH_CACHE=0": (
        "import os\nos.environ['LSSF_HASH_CACHE'] = '0'\nfrom lssf import fuse",
        "fuse('{d}/finetuned', '{d}/patch', '{d}/fused', overwrite=True, progress=False)",
    ),
    "fuse, pread even on a cache hit": (
        "import importlib\nfrom lssf import fuse\n"
        "importlib.import_module('lssf.fuse').READ_MODE = 'read'",
        "fuse('{d}/finetuned', '{d}/patch', '{d}/fused', overwrite=True, progress=False)",
    ),
    "sha256 only": (
        "import hashlib\nfrom pathlib import Path",
        "[hashlib.file_digest(open(f, 'rb'), 'sha256').hexdigest()\n"
        " for f in sorted(Path('{d}/finetuned').glob('*.safetensors'))]",
    ),
    "compute only": (
        "from pathlib import Path\nfrom lssf.fuse import fused_rows\n"
        "from lssf.devices import one_thread_ops\n"
        "from lssf.patch import SafetyPatch\nfrom lssf.checkpoint import Checkpoint\n"
        "p = SafetyPatch.load('{d}/patch')\n"
        "with Checkpoint(Path('{d}/finetuned')) as ck:\n"
        "    work = [(ck.get(n), *p.factors(n)) for n in p.manifest.tensors]",
        "with one_thread_ops():  # as fuse runs it\n"
        "    for w, u, c in work:\n        fused_rows(w, u, c, 1.0, torch.empty_like(w))",
    ),
}  # fmt: skip


def write_finetune(folder: Path, shape: LlamaShape) -> None:
    """A bf16 checkpoint in ~500 MB shards, no model card (so no lineage to check)."""
    from lssf.synthetic import write_checkpoint

    def make(name: str, s: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        return torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02

    write_checkpoint(folder, shape, make, dtype=torch.bfloat16, shard_bytes=500_000_000)


def write_patch(
    folder: Path,
    finetuned: Path,
    shape: LlamaShape,
    ranks: list[tuple[int, ...]] | None = None,
) -> None:
    """A valid patch folder for ``finetuned``: orthonormal ``U`` of the ranks in ``ranks``.

    ``ranks``: one row of per-module ranks (``MODULES``' order) per layer, layer n using row
    ``n % len(ranks)``; default ``RANKS``.
    """
    from lssf.config import PatchConfig
    from lssf.outputs import write_json
    from lssf.patch import FACTORS, MANIFEST, PatchManifest, TensorRecord
    from lssf.sources import SourceRecord
    from lssf.st_io import AppendingWriter, file_sha256

    folder.mkdir(parents=True, exist_ok=True)
    writer, records = AppendingWriter(folder / FACTORS), {}
    table = RANKS if ranks is None else ranks
    dims = dict(shape.tensors())
    for n in range(shape.layers):
        for module, rank in zip(MODULES, table[n % len(table)], strict=True):
            name = f"model.layers.{n}.{module}.weight"
            d_out, d_in = dims[name]
            g = torch.Generator().manual_seed(n * 31 + len(records))
            u, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=g))
            writer.write(name + ".U", u.contiguous())
            writer.write(name + ".C", torch.randn(rank, d_in, generator=g) * 0.01)
            records[name] = TensorRecord(
                shape=(d_out, d_in), rank=rank, entropy_ratio=0.9, energy_kept=0.9,
                n_nonzero=rank, top_singular_value=0.5, delta_norm=1.0,
            )  # fmt: skip
    writer.close()
    src = SourceRecord(ref=str(finetuned), kind="local", revision="synthetic", path=str(finetuned))
    manifest = PatchManifest(
        lssf_version="bench", config=PatchConfig(), aligned=src, reference=src, tensors=records,
        factors_sha256=file_sha256(folder / FACTORS),
    )  # fmt: skip
    write_json(folder / MANIFEST, manifest.model_dump(mode="json"))
    write_json(folder / "lssf_provenance.json", {"tool": "lssf", "kind": "patch"})


def warm_cache(finetuned: Path, cache: Path) -> None:
    """Every input shard's digest in ``cache``, as a first fuse leaves it (untimed)."""
    from lssf import hashcache

    before = os.environ.get(hashcache.ENV_DIR)
    os.environ[hashcache.ENV_DIR] = str(cache)
    try:
        time.sleep(hashcache.RACY_MARGIN_S)  # a file written just now is not trusted yet
        for f in sorted(finetuned.glob("*.safetensors")):
            hashcache.file_sha256(f)
            if hashcache.cached_sha256(f) is None:
                raise RuntimeError(f"{f}: digest not cached; the warm rows would hash it")
    finally:
        if before is None:
            os.environ.pop(hashcache.ENV_DIR)
        else:
            os.environ[hashcache.ENV_DIR] = before


def fresh_outputs(folder: Path) -> None:
    """Every run writes new files into free memory: an earlier output is deleted untimed.

    Writing over files that exist (the floor's ``copy/``) or beside an output about to be
    replaced (``--overwrite``) costs the kernel differently; measured here, up to 2x.
    Dirty pages of earlier runs are written back first (``os.sync``, untimed), so no run pays
    for another's writeback. Even so the 1 GB floor varied from 0.9 to 3.0 s on this VM on
    2026-12-02: compare rows of the same round, not runs of different days.
    """
    for name in ("copy", "fused"):
        shutil.rmtree(folder / name, ignore_errors=True)
    os.sync()
    time.sleep(0.5)


def run_inproc(op: str, folder: Path, env: dict[str, str], src: Path | None) -> dict:
    fresh_outputs(folder)
    imports, code = OPS[op]
    body = PRELUDE.format(imports=imports.format(d=folder)) + code.format(d=folder) + EPILOGUE
    if src is not None:
        env = env | {"PYTHONPATH": str(src)}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", body],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=folder,  # not the repository: `import lssf` must find PYTHONPATH's copy for --before
    )
    outer = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{op}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"process_s": outer}


def run_cli(folder: Path, env: dict[str, str]) -> dict:
    """``lssf fuse`` as a user runs it; RSS from the child's rusage (a fresh exec of the CLI)."""
    fresh_outputs(folder)
    cli = Path(sys.executable).with_name("lssf")
    cmd = [str(cli), "fuse", "--finetuned", f"{folder}/finetuned", "--patch", f"{folder}/patch",
           "--out", f"{folder}/fused", "--overwrite"]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=folder
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"lssf fuse: {err[-3000:]}")
    return {
        "wall_s": wall,
        "process_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def checkout(rev: str, root: Path) -> Path:
    """lssf as of git revision ``rev``, for the "before" rows."""
    dst = root / f"lssf-{rev.replace('/', '_')}"
    if not dst.exists():
        dst.mkdir(parents=True)
        tar = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "lssf"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=tar, check=True)
    return dst


def bench_size(name: str, folder: Path, args: argparse.Namespace, before: Path | None) -> list:
    if not (folder / "patch" / "manifest.json").exists():
        write_finetune(folder / "finetuned", SIZES[name])
        write_patch(folder / "patch", folder / "finetuned", SIZES[name])
    cache = folder / "hash-cache"  # never the user's: the cold rows set LSSF_HASH_CACHE=0
    base_env = os.environ | {"PYTHONWARNINGS": "ignore", "LSSF_CACHE_DIR": str(cache)}
    warm_cache(folder / "finetuned", cache)
    envs = {"default": base_env, "1": base_env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
    plan = []
    for threads, env in envs.items():
        plan += [(op, threads, env, None) for op in OPS]
        plan.append(("fuse, whole process (lssf fuse)", threads, env, None))
        if before is not None:
            plan.append(("fuse before, in-process", threads, env, before))
    runs: dict[tuple[str, str], list[dict]] = {(op, t): [] for op, t, _, _ in plan}
    order = random.Random(0)  # seeded: the same orders on every machine
    for _ in range(args.repeats):  # alternate the operations, so drifting load hits all alike
        # In a fixed order a slow phase of the machine kept landing on the same rows (seen on
        # this VM, 2026-12-02); each round runs the rows in a new order instead.
        for op, threads, env, src in order.sample(plan, len(plan)):
            if op.startswith("fuse, whole"):
                r = run_cli(folder, env)
            else:
                r = run_inproc(op.replace("fuse before", "fuse"), folder, env, src)
            runs.setdefault((op, threads), []).append(r)
    rows = []
    gb = sum(f.stat().st_size for f in (folder / "finetuned").glob("*.safetensors")) / 1e9
    for (op, threads), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "process_s")}
        rows.append(
            (name, gb, op, threads, med | {"peak_rss_mb": max(r["peak_rss_mb"] for r in rs)})
        )
    return rows


def print_table(rows: list) -> None:
    floor = {(s, t): r for s, _, op, t, r in rows if op == "I/O floor"}
    print(
        "| size | GB | operation | threads | wall s | CPU s | process s | / floor | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size, gb, op, threads, r in rows:
        f = floor[(size, threads)]
        key = "process_s" if "whole" in op else "wall_s"
        ratio = r[key] / f[key]
        print(
            f"| {size} | {gb:.3f} | {op} | {threads} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['process_s']:.2f} | {ratio:.2f}x | {r['peak_rss_mb']:.0f} |"
        )
    print(
        "\n/ floor: in-process wall over the floor's in-process wall; for the whole-process row,"
        " the process's wall over the floor's whole process (interpreter and imports included)."
    )
    sizes = sorted({s for s, *_ in rows}, key=list(SIZES).index)
    if len(sizes) > 1:
        rss = {(s, op, t): r["peak_rss_mb"] for s, _, op, t, r in rows}
        for op in ("fuse, in-process", "fuse, whole process (lssf fuse)"):
            ratio = rss[(sizes[-1], op, "default")] / rss[(sizes[0], op, "default")]
            print(f"{op}: peak RSS {sizes[-1]} / {sizes[0]} = {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep checkpoints here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["0.25GB", "1GB"], choices=list(SIZES))
    parser.add_argument("--4gb", dest="four", action="store_true", help="add the 4 GB model")
    parser.add_argument("--before", help="also time lssf as of this git revision")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lssf-fuse-bench-"))
    before = checkout(args.before, root) if args.before else None
    sizes = args.sizes + (["4GB"] if args.four else [])
    rows = []
    for name in sizes:
        rows += bench_size(name, root / name, args, before)
    print(f"torch {torch.__version__}, default threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, hash cache warm "
          "(a private LSSF_CACHE_DIR) unless a row says LSSF_HASH_CACHE=0\n")  # fmt: skip
    print_table(rows)
    if args.workdir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

"""``lssf quickstart``: the core engine end to end on tiny generated checkpoints."""

from __future__ import annotations

from pathlib import Path

from lssf.extract import extract
from lssf.fuse import fuse
from lssf.report import plot_ranks, render_table
from lssf.synthetic import LlamaShape, make_trio


def run_quickstart(workdir: Path, console) -> Path:
    """Build a reference/aligned/fine-tuned trio, extract the patch, fuse, print the table."""
    workdir = Path(workdir).absolute()
    folders = make_trio(workdir / "models", LlamaShape(hidden=128, intermediate=344, layers=4))
    console.print(f"[bold]1.[/] tiny Llama checkpoints in {workdir / 'models'}")
    patch = extract(folders["aligned"], folders["reference"], workdir / "patch", overwrite=True)
    console.print(f"[bold]2.[/] safety patch {patch.patch_id} in {patch.folder}")
    result = fuse(folders["finetuned"], patch, workdir / "realigned", overwrite=True)
    console.print(f"[bold]3.[/] re-aligned model ({result.n_fused} tensors fused) in {result.out}")
    console.print(render_table(patch.manifest))
    plot = plot_ranks(patch.manifest, workdir / "ranks.png")
    console.print(f"rank plot: {plot}")
    return result.out

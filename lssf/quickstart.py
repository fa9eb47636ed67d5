"""``lssf quickstart``: the core engine end to end on tiny generated checkpoints.

Everything goes into one work folder that lssf claims (``lssf.outputs.claim_folder``: new, empty
or made by a previous quickstart); each output in it is built aside and renamed into place, so
nothing already there is written through (a symlink) or replaced unless lssf made it.
"""

from __future__ import annotations

from pathlib import Path

from lssf.extract import extract
from lssf.fuse import fuse
from lssf.outputs import (
    atomic_file,
    atomic_folder,
    atomic_write_text,
    claim_folder,
    mark_folder,
)
from lssf.report import plot_ranks, render_table
from lssf.synthetic import LlamaShape, make_trio

ROLES = ("reference", "aligned", "finetuned")


def run_quickstart(workdir: Path, console) -> Path:
    """Build a reference/aligned/fine-tuned trio, extract the patch, fuse, print the table."""
    workdir = claim_folder(workdir, "quickstart")
    models = workdir / "models"
    with atomic_folder(models, overwrite=True) as tmp:
        trio = make_trio(tmp, LlamaShape(hidden=128, intermediate=344, layers=4))
        card = trio["finetuned"] / "README.md"  # it names the aligned folder: the final one
        atomic_write_text(card, card.read_text(encoding="utf-8").replace(str(tmp), str(models)))
        mark_folder(tmp, "quickstart-models")
    folders = {role: models / role for role in ROLES}
    console.print(f"[bold]1.[/] tiny Llama checkpoints in {models}")
    patch = extract(folders["aligned"], folders["reference"], workdir / "patch", overwrite=True)
    console.print(f"[bold]2.[/] safety patch {patch.patch_id} in {patch.folder}")
    result = fuse(folders["finetuned"], patch, workdir / "realigned", overwrite=True)
    console.print(f"[bold]3.[/] re-aligned model ({result.n_fused} tensors fused) in {result.out}")
    console.print(render_table(patch.manifest))
    plot = workdir / "ranks.png"
    with atomic_file(plot, overwrite=True) as tmp_png:
        plot_ranks(patch.manifest, tmp_png)
    console.print(f"rank plot: {plot}")
    return result.out

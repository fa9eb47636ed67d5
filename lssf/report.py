"""Human views of a safety patch: the per-layer table and the rank-by-layer plot."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lssf.patch import PatchManifest

if TYPE_CHECKING:
    from rich.table import Table

LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Row:
    """One line of the per-layer table."""

    tensor: str
    layer: int | None
    module: str  # e.g. "self_attn.q_proj"
    shape: tuple[int, int]
    rank: int
    entropy_ratio: float
    energy_kept: float


def split_name(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``(3, "self_attn.q_proj")``."""
    match = LAYER.search(name)
    if not match:
        return None, name.removesuffix(".weight")
    return int(match.group(1)), name[match.end() :].removesuffix(".weight")


def rows(manifest: PatchManifest) -> list[Row]:
    """The table's rows, by layer then module."""
    out = [
        Row(name, *split_name(name), rec.shape, rec.rank, rec.entropy_ratio, rec.energy_kept)
        for name, rec in manifest.tensors.items()
    ]
    return sorted(out, key=lambda r: (r.layer if r.layer is not None else -1, r.module))


def render_table(manifest: PatchManifest, title: str | None = None) -> Table:
    """A rich Table: layer, module, shape, rank, H_r/H_n, energy kept."""
    from rich.table import Table

    table = Table(title=title or f"safety patch {manifest.patch_id}")
    for col in ("layer", "module", "shape", "rank", "H_r/H_n", "energy kept"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for r in rows(manifest):
        table.add_row(
            "-" if r.layer is None else str(r.layer),
            r.module,
            "x".join(map(str, r.shape)),
            str(r.rank),
            f"{r.entropy_ratio:.3f}",
            f"{r.energy_kept:.3f}",
        )
    return table


def summary(manifest: PatchManifest) -> dict[str, float]:
    """Tensor count, rank min/mean/max and the factors' share of the targeted parameters."""
    ranks = [r.rank for r in manifest.tensors.values()]
    params = sum(r.rank * (r.shape[0] + r.shape[1]) for r in manifest.tensors.values())
    full = sum(r.shape[0] * r.shape[1] for r in manifest.tensors.values())
    return {
        "tensors": len(ranks),
        "rank_min": min(ranks, default=0),
        "rank_mean": sum(ranks) / max(len(ranks), 1),
        "rank_max": max(ranks, default=0),
        "factor_params_fraction": params / max(full, 1),
    }


def plot_ranks(manifest: PatchManifest, path: Path) -> Path:
    """Rank by layer, one line per module type, and H_r/H_n below; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    by_module: dict[str, list[Row]] = {}
    for r in rows(manifest):
        by_module.setdefault(r.module, []).append(r)
    fig, (ax_rank, ax_ent) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for module, rs in sorted(by_module.items()):
        xs = [r.layer if r.layer is not None else -1 for r in rs]
        ax_rank.plot(xs, [r.rank for r in rs], marker="o", label=module)
        ax_ent.plot(xs, [r.energy_kept for r in rs], marker=".", label=module)
    cfg = manifest.config
    ax_rank.set_ylabel("safety-critical rank r")
    ax_rank.set_title(f"LSSF patch {manifest.patch_id}: {cfg.rank_rule} rule, eta = {cfg.eta}")
    ax_rank.legend(fontsize=7, ncol=2)
    ax_ent.set_ylabel("energy kept")
    ax_ent.set_xlabel("layer")
    ax_ent.set_ylim(0, 1.05)
    ax_ent.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Human views of a safety patch: the per-layer table and the rank-by-layer plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from lssf.patch import PatchManifest, TensorRecord

if TYPE_CHECKING:
    from rich.table import Table

LAYER = re.compile(r"\.(\d+)\.")


def rows(manifest: PatchManifest) -> list[tuple[int, str, TensorRecord]]:
    """``(layer, module, record)`` by layer then module; layer -1 outside the repeated blocks.

    ``model.layers.3.self_attn.q_proj.weight`` is layer 3, module ``self_attn.q_proj``.
    """
    out = []
    for name, rec in manifest.tensors.items():
        match = LAYER.search(name)
        layer, module = (int(match.group(1)), name[match.end() :]) if match else (-1, name)
        out.append((layer, module.removesuffix(".weight"), rec))
    return sorted(out, key=lambda row: row[:2])


def render_table(manifest: PatchManifest, title: str | None = None) -> Table:
    """A rich Table: layer, module, shape, rank, H_r/H_n, energy kept."""
    from rich.table import Table

    table = Table(title=title or f"safety patch {manifest.patch_id}")
    for col in ("layer", "module", "shape", "rank", "H_r/H_n", "energy kept"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for layer, module, rec in rows(manifest):
        table.add_row(
            "-" if layer < 0 else str(layer),
            module,
            "x".join(map(str, rec.shape)),
            str(rec.rank),
            f"{rec.entropy_ratio:.3f}",
            f"{rec.energy_kept:.3f}",
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

    by_module: dict[str, list[tuple[int, TensorRecord]]] = {}
    for layer, module, rec in rows(manifest):
        by_module.setdefault(module, []).append((layer, rec))
    fig, (ax_rank, ax_ent) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for module, recs in sorted(by_module.items()):
        xs = [layer for layer, _ in recs]
        ax_rank.plot(xs, [rec.rank for _, rec in recs], marker="o", label=module)
        ax_ent.plot(xs, [rec.energy_kept for _, rec in recs], marker=".", label=module)
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

"""Human views of a safety patch: the per-layer table and the rank-by-layer plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # at run time only where needed: `safe_text` serves `lssf gate` (no torch)
    from rich.table import Table

    from lssf.patch import PatchManifest, TensorRecord

LAYER = re.compile(r"\.(\d+)\.")
# What must not reach a terminal verbatim: C0/C1 controls (ANSI escapes, carriage returns),
# zero-width and bidi-override characters, lone surrogates (unprintable in UTF-8).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def safe_text(value: object, limit: int = 200, *, markup: bool = True) -> str:
    r"""``value`` as text that prints as itself, for the console or a plot.

    Cut to ``limit`` characters; unsafe characters shown as ``\x1b``-style escapes; with
    ``markup`` (rich), ``[...]`` escaped, so that ``[/]`` or ``[link=...]`` in a tensor name or
    a report field is text, not markup.
    """
    text = str(value)
    if len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    text = _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    if not markup:
        return text
    from rich.markup import escape

    return escape(text)


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

    table = Table(title=safe_text(title or f"safety patch {manifest.patch_id}"))
    for col in ("layer", "module", "shape", "rank", "H_r/H_n", "energy kept"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for layer, module, rec in rows(manifest):
        table.add_row(
            "-" if layer < 0 else str(layer),
            safe_text(module),
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
        label = safe_text(module, 60, markup=False).replace("$", r"\$")  # no mathtext
        ax_rank.plot(xs, [rec.rank for _, rec in recs], marker="o", label=label)
        ax_ent.plot(xs, [rec.energy_kept for _, rec in recs], marker=".", label=label)
    cfg = manifest.config
    ax_rank.set_ylabel("safety-critical rank r")
    title = safe_text(f"LSSF patch {manifest.patch_id}: {cfg.rank_rule} rule", 100, markup=False)
    ax_rank.set_title(f"{title}, eta = {cfg.eta}".replace("$", r"\$"))
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

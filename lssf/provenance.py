"""Provenance that travels with the weights: a JSON record and a model card."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from lssf._version import __version__
from lssf.checkpoint import folder_file
from lssf.outputs import PROVENANCE
from lssf.patch import PatchManifest
from lssf.sources import SourceRecord

__all__ = ["PROVENANCE", "declared_base", "model_card", "provenance"]


def declared_base(folder: Path) -> str | None:
    """The base model a fine-tune declares: model card ``base_model``, else PEFT's config.

    Files that leave the folder (symlinks) are refused, as everywhere (``folder_file``).
    """
    card = folder_file(folder, "README.md")
    if card is not None:
        match = re.match(r"^---\n(.*?)\n---", card.read_text(errors="replace"), re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except (yaml.YAMLError, RecursionError):
                meta = {}
            base = meta.get("base_model") if isinstance(meta, dict) else None
            if isinstance(base, list) and base:
                base = base[0]
            if isinstance(base, str):
                return base
    adapter = folder_file(folder, "adapter_config.json")
    if adapter is not None:
        try:
            config = json.loads(adapter.read_bytes())
        except (OSError, ValueError, RecursionError):
            return None
        base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        return base if isinstance(base, str) and base else None
    return None


def provenance(
    manifest: PatchManifest, finetuned: SourceRecord, alpha: float, patch_id: str
) -> dict[str, Any]:
    return {
        "tool": "lssf",
        "lssf_version": __version__,
        "method": manifest.method,
        "alpha": alpha,
        "patch_id": patch_id,
        "patch_config": manifest.config.model_dump(mode="json"),
        "sources": {
            "finetuned": finetuned.model_dump(mode="json"),
            "aligned": manifest.aligned.model_dump(mode="json"),
            "reference": manifest.reference.model_dump(mode="json"),
        },
        "ranks": {name: rec.rank for name, rec in manifest.tensors.items()},
    }


def _source_line(label: str, rec: SourceRecord) -> str:
    return f"| {label} | `{rec.name}` | `{rec.revision}` |"


def model_card(manifest: PatchManifest, finetuned: SourceRecord, alpha: float) -> str:
    ranks = [rec.rank for rec in manifest.tensors.values()]
    cfg = manifest.config
    front = {
        "base_model": manifest.aligned.name,
        "tags": ["lssf", "safety-realignment"],
        "library_name": "transformers",
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# Safety re-aligned: {finetuned.name}",
        "",
        "This model is the fine-tune below with its safety subspace restored by",
        "[LSSF](https://arxiv.org/abs/2602.00038) (Low-Rank Safety Subspace Fusion):",
        "`W = W_ft + alpha * P' @ (W_aligned - W_reference)` on every targeted weight.",
        "",
        "| role | model | revision |",
        "|---|---|---|",
        _source_line("fine-tuned", finetuned),
        _source_line("aligned", manifest.aligned),
        _source_line("reference", manifest.reference),
        "",
        f"Method parameters: rank rule `{cfg.rank_rule}`, eta = {cfg.eta}, "
        f"max rank = {cfg.max_rank}, a_1 = {cfg.weight_top}, alpha = {alpha}.",
        f"Patch `{manifest.patch_id}`: {len(ranks)} tensors, rank "
        f"min {min(ranks, default=0)} / mean {sum(ranks) / max(len(ranks), 1):.1f} / "
        f"max {max(ranks, default=0)}.",
        "",
        f"Made with lssf {__version__}; full record in `{PROVENANCE}`.",
        "",
    ]
    return "\n".join(lines)

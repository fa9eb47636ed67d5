"""Provenance that travels with every output: one record (``lssf_provenance.json``) and a card."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from lssf._version import __version__
from lssf.checkpoint import folder_file
from lssf.config import PatchConfig
from lssf.models import Frozen
from lssf.outputs import PROVENANCE, atomic_write_text, write_json
from lssf.patch import PatchManifest
from lssf.report import summary
from lssf.sources import SourceRecord

__all__ = ["PROVENANCE", "Provenance", "declared_base", "model_card", "write_outputs"]

log = logging.getLogger(__name__)
PAPER = "[LSSF](https://arxiv.org/abs/2602.00038)"


class Provenance(Frozen):
    """What an output was made from: patch, alpha, every source at its exact revision."""

    tool: Literal["lssf"] = "lssf"
    lssf_version: str = __version__
    method: str
    alpha: float
    patch_id: str
    patch_config: PatchConfig
    # finetuned (absent for the patch alone), aligned, reference, finetuned_base (a LoRA's)
    sources: dict[str, SourceRecord]
    ranks: dict[str, int] | None = None  # a fused model's: patch rank per tensor
    finetuned_kind: Literal["full", "lora"] | None = None
    output_format: Literal["model", "adapter"] = Field("model", alias="format")
    adapter_ranks: dict[str, int] | None = None  # an adapter's: LoRA rank per module

    @classmethod
    def build(
        cls,
        manifest: PatchManifest,
        alpha: float,
        finetune: dict[str, SourceRecord] | None = None,
        adapter_ranks: dict[str, int] | None = None,
    ) -> Provenance:
        """The record of an output of ``manifest``'s patch; ``adapter_ranks`` for an adapter.

        ``finetune``: the fine-tune's sources (None: the patch alone, exported as an adapter).
        """
        finetune = finetune or {}
        sources = {"finetuned": finetune["finetuned"]} if "finetuned" in finetune else {}
        sources |= {"aligned": manifest.aligned, "reference": manifest.reference}
        sources |= {k: v for k, v in finetune.items() if k != "finetuned"}
        kind = None if not finetune else "lora" if "finetuned_base" in finetune else "full"
        return cls(
            method=manifest.method,
            alpha=alpha,
            patch_id=manifest.patch_id,
            patch_config=manifest.config,
            sources=sources,
            ranks={n: r.rank for n, r in manifest.tensors.items()} if finetune else None,
            finetuned_kind=kind,
            format="model" if adapter_ranks is None else "adapter",
            adapter_ranks=adapter_ranks,
        )

    def to_json(self) -> dict[str, Any]:
        """The on-disk form: ``format`` by its name, top-level nulls left out (nested ones stay)."""
        data = self.model_dump(mode="json", by_alias=True)
        return {key: value for key, value in data.items() if value is not None}


def write_outputs(folder: Path, provenance: Provenance, card: str) -> None:
    """``lssf_provenance.json`` and ``README.md``, each written atomically."""
    write_json(folder / PROVENANCE, provenance.to_json())
    atomic_write_text(folder / "README.md", card)


def declared_base(folder: Path) -> str | None:
    """The base a fine-tune declares: its card's ``base_model`` (the first), else PEFT's config."""
    from huggingface_hub import ModelCard

    base = None
    card = folder_file(folder, "README.md")
    text = card.read_text(errors="replace") if card is not None else ""
    if text.startswith("---"):
        with contextlib.suppress(ValueError, TypeError, yaml.YAMLError, RecursionError):
            base = ModelCard(text, ignore_metadata_errors=True).data.base_model
    if isinstance(base, list) and base:
        base = base[0]
    if isinstance(base, str) and base:
        return base
    adapter, config = folder_file(folder, "adapter_config.json"), None
    with contextlib.suppress(OSError, ValueError, RecursionError):
        config = json.loads(adapter.read_bytes()) if adapter is not None else None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def _card(base_model: str | None, library: str, tags: list[str], body: list[str]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_model, library_name=library, tags=tags)
    footer = [f"Made with lssf {__version__}; full record in `{PROVENANCE}`.", ""]
    return str(ModelCard("\n".join(["---", data.to_yaml(), "---", "", *body, "", *footer])))


def model_card(prov: Provenance, manifest: PatchManifest, adapter: dict[str, Any] | None) -> str:
    """The card of an output: a fused model, or an adapter (``adapter``: its PEFT config)."""
    finetuned = prov.sources.get("finetuned")
    if adapter is not None:
        return _adapter_card(prov, adapter, finetuned.name if finetuned else None)
    cfg, stats = manifest.config, summary(manifest)
    roles = (("finetuned", "fine-tuned"), ("aligned", "aligned"), ("reference", "reference"))
    sources = [(label, prov.sources[key]) for key, label in roles if key in prov.sources]
    body = [
        f"# Safety re-aligned: {finetuned.name if finetuned else '?'}",
        "",
        f"This model is the fine-tune below with its safety subspace restored by {PAPER}",
        "(Low-Rank Safety Subspace Fusion):",
        "`W = W_ft + alpha * P' @ (W_aligned - W_reference)` on every targeted weight.",
        "",
        "| role | model | revision |",
        "|---|---|---|",
        *(f"| {label} | `{rec.name}` | `{rec.revision}` |" for label, rec in sources),
        "",
        f"Method parameters: rank rule `{cfg.rank_rule}`, eta = {cfg.eta}, "
        f"max rank = {cfg.max_rank}, a_1 = {cfg.weight_top}, alpha = {prov.alpha}.",
        f"Patch `{manifest.patch_id}`: {stats['tensors']} tensors, rank min {stats['rank_min']} "
        f"/ mean {stats['rank_mean']:.1f} / max {stats['rank_max']}.",
    ]
    return _card(manifest.aligned.name, "transformers", ["lssf", "safety-realignment"], body)


def _adapter_card(prov: Provenance, config: dict[str, Any], ft: str | None) -> str:
    """A short card for an adapter folder (PEFT and vLLM read only the config)."""
    what = f"the LoRA fine-tune `{ft}` with its safety subspace restored"
    if not ft:
        what = "the safety patch alone"
    base = config["base_model_name_or_path"]
    ranks = list(config["rank_pattern"].values())
    body = [
        f"# LSSF adapter: {what}",
        "",
        f"A PEFT LoRA adapter on `{base}` holding {what} by",
        f"{PAPER} (patch `{prov.patch_id}`, alpha = {prov.alpha}). {len(ranks)} modules, rank "
        f"{min(ranks, default=0)}-{max(ranks, default=0)}; every module's scale is 1.",
        "Load it with `PeftModel.from_pretrained(aligned_model, this_folder)` or serve it",
        f"with vLLM (`--enable-lora --max-lora-rank` >= {config['r']}).",
    ]
    return _card(base, "peft", ["lssf", "safety-realignment", "lora"], body)

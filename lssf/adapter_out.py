"""Write PEFT LoRA adapters: a LoRA fine-tune with the safety patch folded in, or the patch alone.

Per module the adapter holds ``B = [s * B_ft, alpha * U']`` and ``A = [A_ft ; C]``, so that
``B @ A = s * B_ft @ A_ft + alpha * U' C``. All scaling is baked into ``B`` and every module is
written with an effective scale of exactly 1: ``lora_alpha = r`` and, per module,
``rank_pattern[m] = alpha_pattern[m] = r_m`` with ``use_rslora`` off. PEFT reads the patterns;
vLLM ignores them and applies one ``lora_alpha / r`` to every module (taking each module's rank
from its tensors), which is also 1. Both therefore apply the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lssf.checkpoint import Checkpoint
from lssf.config import check_alpha
from lssf.errors import CheckpointError
from lssf.finetune import finetune_sources, open_patch
from lssf.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, LoraAdapter, MergedView
from lssf.outputs import atomic_folder, write_json
from lssf.patch import SafetyPatch
from lssf.provenance import Provenance, model_card, write_outputs
from lssf.spectral import fused_weight
from lssf.st_io import AppendingWriter

log = logging.getLogger(__name__)

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, d_in), B (d_out, r))


def safety_lora(u: torch.Tensor, c: torch.Tensor, alpha: float, transposed: bool) -> Factors:
    """The patch term ``alpha * U' C`` as LoRA factors ``(A, B)`` with ``B @ A = alpha * U' C``.

    u: (d_out, r), c: (r, d_in) -> A = C, B = alpha * U'. A layer that stores its weight
    transposed (fan_in_fan_out, embeddings) applies ``(B @ A)^T``: A = U'^T, B = alpha * C^T.
    """
    if transposed:
        return u.float().T.contiguous(), alpha * c.float().T.contiguous()
    return c.float(), alpha * u.float()


def combine_lora(first: Factors | None, scale: float, second: Factors | None) -> Factors:
    """``A = [A_1 ; A_2]`` (r_1 + r_2, d_in), ``B = [scale * B_1, B_2]`` (d_out, r_1 + r_2)."""
    parts = [] if first is None else [(first[0].float(), scale * first[1].float())]
    parts += [] if second is None else [second]
    if not parts:
        raise ValueError("combine_lora needs at least one pair of factors")
    return torch.cat([a for a, _ in parts], 0), torch.cat([b for _, b in parts], 1)


def lora_keys(module: str, embedding: bool) -> tuple[str, str]:
    """PEFT's on-disk names of a module's A and B."""
    if embedding:
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def adapter_config(ranks: dict[str, int], base: str | None, **fields: Any) -> dict[str, Any]:
    """A PEFT LoraConfig in which every module's scale ``alpha_m / r_m`` is exactly 1."""
    top = max(ranks.values(), default=1)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    config.update(fields)
    return config


class AdapterWriter:
    """Streams modules into ``adapter_model.safetensors`` and remembers their ranks."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        self.ranks: dict[str, int] = {}
        self._writer = AppendingWriter(self.folder / ADAPTER_WEIGHTS, {"format": "pt"})

    def module(self, name: str, factors: Factors, embedding: bool = False) -> None:
        """Write one module's factors in ``dtype``; a rank-0 module is left out."""
        a, b = factors
        if a.shape[0] == 0:
            return
        a_key, b_key = lora_keys(name, embedding)
        self._writer.write(a_key, a.to(self.dtype).contiguous())
        self._writer.write(b_key, b.to(self.dtype).contiguous())
        self.ranks[name] = int(a.shape[0])

    def tensor(self, key: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (modules_to_save) as it is."""
        self._writer.write(key, tensor)

    def close(self, base: str | None, **fields: Any) -> dict[str, Any]:
        """Finish the weights and write ``adapter_config.json``; returns the config."""
        self._writer.close()
        config = adapter_config(self.ranks, base, **fields)
        write_json(self.folder / ADAPTER_CONFIG, config)
        return config


def patch_module(name: str) -> str:
    """The module of a patched tensor; only module weights can carry a LoRA."""
    if not name.endswith(".weight"):
        raise CheckpointError(
            f"patch tensor {name!r} is not a module weight (name.weight); it cannot be written "
            "as a LoRA adapter"
        )
    return name.removesuffix(".weight")


def _write_union(
    writer: AdapterWriter,
    adapter: LoraAdapter,
    base: Checkpoint,
    patch: SafetyPatch,
    alpha: float,
    progress: bool,
) -> int:
    """Every module the fine-tune or the patch touches, in the base's tensor order."""
    patched = {n for n, rec in patch.manifest.tensors.items() if rec.rank > 0}
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    n_fused = 0
    for name in tqdm(base.names(), desc="adapter", unit="tensor", disable=not progress):
        module = adapter.modules.get(name)
        if name in adapter.overrides and module is None:
            continue  # a whole tensor (modules_to_save): written with the overrides
        if module is None and name not in patched:
            continue
        transposed = module.transposed if module else fan_in_fan_out
        safety = safety_lora(*patch.factors(name), alpha, transposed) if name in patched else None
        ft = adapter.factors(module) if module else None
        scale = module.scale if module else 1.0
        mod_name = module.name if module else patch_module(name)
        writer.module(mod_name, combine_lora(ft, scale, safety), bool(module and module.embedding))
        n_fused += safety is not None
    return n_fused


def _write_overrides(
    writer: AdapterWriter, adapter: LoraAdapter, patch: SafetyPatch, alpha: float
) -> int:
    """Whole saved tensors, with the patch fused into any that the patch targets."""
    n_fused = 0
    for name, key in adapter.overrides.items():
        tensor = adapter.tensor(key)
        if name in patch.manifest.tensors and name not in adapter.modules:
            tensor = fused_weight(tensor, *patch.factors(name), alpha)
            n_fused += 1
        writer.tensor(key, tensor)
    return n_fused


def write_combined_adapter(
    ft: MergedView,
    patch: SafetyPatch,
    out: Path,
    *,
    alpha: float,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[int, Provenance]:
    """One PEFT adapter on the aligned model: the LoRA fine-tune plus ``alpha`` times the patch.

    Shapes have been checked by the caller (``MergedView``, ``check_compatible``).
    Returns the number of patched tensors written and the provenance recorded.
    """
    adapter, base = ft.adapter, ft.base
    config = adapter.config
    sources = finetune_sources(ft, None)
    base_record = sources["finetuned_base"]
    with atomic_folder(out, overwrite=overwrite, inputs=[*ft.folders, patch.folder]) as tmp:
        writer = AdapterWriter(tmp, dtype or adapter.dtype())
        n_fused = _write_union(writer, adapter, base, patch, alpha, progress)
        n_fused += _write_overrides(writer, adapter, patch, alpha)
        written = writer.close(
            base_record.name,
            revision=base_record.revision if base_record.kind == "hub" else None,
            task_type=config.get("task_type") or "CAUSAL_LM",
            fan_in_fan_out=bool(config.get("fan_in_fan_out")),
            modules_to_save=config.get("modules_to_save") or None,
        )
        prov = Provenance.build(patch.manifest, alpha, sources, adapter_ranks=writer.ranks)
        write_outputs(tmp, prov, model_card(prov, patch.manifest, written))
    return n_fused, prov


def export_patch_adapter(
    patch: SafetyPatch | str | Path,
    out: str | Path,
    *,
    alpha: float = 1.0,
    dtype: torch.dtype = torch.float32,
    fan_in_fan_out: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """The safety patch alone as a PEFT LoRA adapter on the aligned model: ``B @ A = alpha U' C``.

    Stack it on a fine-tune's adapter at serving time, or apply it to the aligned model itself.
    """
    alpha = check_alpha(alpha)
    patch = open_patch(patch)
    manifest = patch.manifest
    names = [n for n, rec in manifest.tensors.items() if rec.rank > 0]
    modules = [patch_module(n) for n in names]  # refuse before anything is written
    with patch, atomic_folder(Path(out), overwrite=overwrite, inputs=[patch.folder]) as tmp:
        writer = AdapterWriter(tmp, dtype)
        for name, module in tqdm(
            list(zip(names, modules, strict=True)),
            desc="export",
            unit="tensor",
            disable=not progress,
        ):
            writer.module(module, safety_lora(*patch.factors(name), alpha, fan_in_fan_out))
        written = writer.close(manifest.aligned.name, fan_in_fan_out=fan_in_fan_out)
        prov = Provenance.build(manifest, alpha, adapter_ranks=writer.ranks)
        write_outputs(tmp, prov, model_card(prov, manifest, written))
    log.info("patch %s (alpha=%s) written as a LoRA adapter to %s", patch.patch_id, alpha, out)
    return Path(out)

"""Write PEFT LoRA adapters: a LoRA fine-tune with the safety patch folded in, or the patch alone.

Per module ``B = [s * B_ft, alpha * U']`` and ``A = [A_ft ; C]``, so ``B @ A = s * B_ft @ A_ft +
alpha * U' C``. All scaling is baked into ``B``: ``lora_alpha = r`` and ``rank_pattern[m] =
alpha_pattern[m] = r_m`` (``use_rslora`` off) give every module a scale of exactly 1 in PEFT,
and in vLLM, which ignores the patterns and applies one ``lora_alpha / r`` to every module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lssf.config import check_alpha
from lssf.errors import CheckpointError
from lssf.finetune import finetune_sources, open_patch
from lssf.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, MergedView
from lssf.outputs import atomic_folder, write_json
from lssf.patch import SafetyPatch, check_effective
from lssf.provenance import Provenance, model_card, write_outputs
from lssf.spectral import fused_weight
from lssf.st_io import AppendingWriter

log = logging.getLogger(__name__)

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, d_in), B (d_out, r))


def safety_lora(u: torch.Tensor, c: torch.Tensor, alpha: float, transposed: bool) -> Factors:
    """The patch term ``alpha * U' C`` as LoRA factors ``(A, B)`` with ``B @ A = alpha * U' C``.

    u: (d_out, r), c: (r, d_in) -> A = C, B = alpha U'; a transposed layer: A = U'^T, B = alpha C^T.
    """
    if transposed:
        return u.float().T.contiguous(), alpha * c.float().T.contiguous()
    return c.float(), alpha * u.float()


def combine_lora(first: Factors, scale: float, second: Factors | None) -> Factors:
    """``A = [A_1 ; A_2]`` (r_1 + r_2, d_in), ``B = [scale * B_1, B_2]`` (d_out, r_1 + r_2)."""
    a, b = first[0].float(), scale * first[1].float()
    if second is None:
        return a, b
    return torch.cat([a, second[0]], 0), torch.cat([b, second[1]], 1)


class AdapterWriter:
    """Streams modules into ``adapter_model.safetensors`` and remembers their ranks."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        self.ranks: dict[str, int] = {}
        self._writer = AppendingWriter(self.folder / ADAPTER_WEIGHTS, {"format": "pt"})

    def module(self, name: str, factors: Factors, embedding: bool = False) -> None:
        """Write one module's factors in ``dtype``, named as PEFT does; rank 0 is left out."""
        rank = int(factors[0].shape[0])
        if rank == 0:
            return
        parts = ("embedding_A", "embedding_B") if embedding else ("A.weight", "B.weight")
        for part, t in zip(parts, factors, strict=True):
            self._writer.write(f"{PREFIX}{name}.lora_{part}", t.to(self.dtype).contiguous())
        self.ranks[name] = rank

    def tensor(self, key: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (modules_to_save) as it is."""
        self._writer.write(key, tensor)

    def close(self, base: str | None, **fields: Any) -> dict[str, Any]:
        """Finish the weights; write and return ``adapter_config.json``, every module at scale 1."""
        self._writer.close()
        top = max(self.ranks.values(), default=1)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "revision": None,
            "r": top,
            "lora_alpha": top,
            "rank_pattern": dict(self.ranks),
            "alpha_pattern": dict(self.ranks),
            "target_modules": sorted(self.ranks),
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
        } | fields
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


def _write_modules(
    writer: AdapterWriter, ft: MergedView, patch: SafetyPatch, alpha: float, progress: bool
) -> int:
    """The fine-tune's modules (base order) and saved tensors, patch folded in; the count fused."""
    adapter = ft.adapter
    patched = {n for n, rank in patch.ranks().items() if rank > 0}
    n_fused = 0
    for name in tqdm(ft.base.names(), desc="adapter", unit="tensor", disable=not progress):
        module = adapter.modules.get(name)
        if module is None and (name in adapter.overrides or name not in patched):
            continue  # untouched, or a whole tensor (modules_to_save): written below
        transposed = module.transposed if module else bool(adapter.config.get("fan_in_fan_out"))
        safety = safety_lora(*patch.factors(name), alpha, transposed) if name in patched else None
        n_fused += safety is not None
        if module is None:
            writer.module(patch_module(name), safety)
        else:
            lora = combine_lora(adapter.factors(module), module.scale, safety)
            writer.module(module.name, lora, module.embedding)
    for name, key in adapter.overrides.items():
        tensor = adapter.weights.get(key)
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

    The caller checked shapes (``MergedView``, ``check_compatible``); returns (n patched, record).
    """
    config = ft.adapter.config
    sources = finetune_sources(ft, None)
    base_record = sources["finetuned_base"]
    with atomic_folder(out, overwrite=overwrite, inputs=[*ft.folders, patch.folder]) as tmp:
        writer = AdapterWriter(tmp, dtype or ft.adapter.dtype())
        n_fused = _write_modules(writer, ft, patch, alpha, progress)
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
    check_effective(patch)
    manifest = patch.manifest
    # Every tensor's module name first: refuse before anything is written.
    modules = {n: patch_module(n) for n, rank in patch.ranks().items() if rank > 0}
    with patch, atomic_folder(Path(out), overwrite=overwrite, inputs=[patch.folder]) as tmp:
        writer = AdapterWriter(tmp, dtype)
        bar = tqdm(modules.items(), desc="export", unit="tensor", disable=not progress)
        for name, module in bar:
            writer.module(module, safety_lora(*patch.factors(name), alpha, fan_in_fan_out))
        written = writer.close(manifest.aligned.name, fan_in_fan_out=fan_in_fan_out)
        prov = Provenance.build(manifest, alpha, adapter_ranks=writer.ranks)
        write_outputs(tmp, prov, model_card(prov, manifest, written))
    log.info("patch %s (alpha=%s) written as a LoRA adapter to %s", patch.patch_id, alpha, out)
    return Path(out)

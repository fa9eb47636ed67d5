"""The organism's configuration: frozen pydantic, hashed for the build cache."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from lssf.models import Frozen

# Bump when the world, the data or the training code changes what a config produces.
# 2: trained under the pinned numerics of `repro` (identical on one machine); the
#    fine-tune starts from the saved aligned weights; eval sets split calibration/held-out.
ORGANISM_VERSION = "2"


class ModelSettings(Frozen):
    """The tiny LlamaForCausalLM (untied embeddings)."""

    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    max_positions: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelSettings:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        return self


class StageSettings(Frozen):
    """One training stage: AdamW (0.9, 0.95), clip 1.0, linear warm-up then the schedule."""

    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    batch_size: int = Field(64, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class LoraSettings(Frozen):
    """peft LoRA on every linear projection of the decoder layers."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)


class OrganismConfig(Frozen):
    """Everything that determines an organism, apart from the seed."""

    model: ModelSettings = ModelSettings()
    base: StageSettings = StageSettings(steps=600, lr=3e-3)
    aligned: StageSettings = StageSettings(steps=300, lr=1e-4)
    finetune: Literal["lora", "full"] = "lora"
    full_finetune: StageSettings = StageSettings(steps=500, lr=2e-4, schedule="constant")
    lora_finetune: StageSettings = StageSettings(steps=500, lr=3e-4, schedule="constant")
    lora: LoraSettings = LoraSettings()

    def finetune_stage(self) -> StageSettings:
        """The schedule of the selected fine-tune."""
        return self.lora_finetune if self.finetune == "lora" else self.full_finetune

    def stage_keys(self, seed: int, versions: dict[str, str]) -> dict[str, str]:
        """Chained hashes of everything that decides each stage's weights.

        `versions` are the library versions, machine and numerics recipe (`repro.versions()`).
        A stage's key covers its own settings and its predecessor's key, so a LoRA and a full
        organism of the same seed share their base and aligned stages.
        """
        common = {"version": ORGANISM_VERSION, "seed": seed, "versions": versions}
        base = digest(common | {"model": self.model.model_dump(), "base": self.base.model_dump()})
        aligned = digest({"after": base, "aligned": self.aligned.model_dump()})
        tune: dict = {"after": aligned, "finetune": self.finetune}
        tune["stage"] = self.finetune_stage().model_dump()
        if self.finetune == "lora":
            tune["lora"] = self.lora.model_dump()
        return {"base": base, "aligned": aligned, "finetuned": digest(tune)}

    def cache_key(self, seed: int, versions: dict[str, str]) -> str:
        """The whole organism's key (its fine-tune's stage key): same key, same bytes."""
        return self.stage_keys(seed, versions)["finetuned"]


def digest(payload: dict) -> str:
    """A stage key: the first 16 hex digits of the sha256 of `payload` as sorted JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

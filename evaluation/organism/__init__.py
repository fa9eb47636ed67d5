"""The model organism: a tiny Llama trio (base, aligned, finetuned) trained from scratch on CPU.

`build_organism(seed, out)` trains or reuses it; `score_model(model_dir, eval_dir)` is the plain
greedy-generation reference scorer. See docs/DESIGN.md ("Model organism").
"""

from evaluation.organism.build import OrganismPaths, build_organism
from evaluation.organism.config import OrganismConfig
from evaluation.organism.score import score_model

__all__ = ["OrganismConfig", "OrganismPaths", "build_organism", "score_model"]

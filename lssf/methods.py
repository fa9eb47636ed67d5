"""Named rank rules and subspace bases: explicit registries, no metaprogramming.

A rule maps a safety spectrum to the number of directions kept. Unknown names fail with the
list of known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lssf.errors import ConfigError
from lssf.spectral import energy_fractions, entropy_rank

PAPER_URL = "https://arxiv.org/abs/2602.00038"
ACTSVD_URL = "https://arxiv.org/abs/2402.05162"


@dataclass(frozen=True)
class RankRule:
    """``select(s, eta)`` returns the rank for singular values ``s: (k,)`` at threshold eta."""

    name: str
    description: str
    reference: str
    select: Callable[[torch.Tensor, float], int]


def _energy_rank(s: torch.Tensor, eta: float) -> int:
    cum = torch.cumsum(energy_fractions(s), dim=0)
    hits = torch.nonzero(cum >= eta - 1e-12)
    return int(hits[0]) + 1 if hits.numel() else int(s.numel())


RANK_RULES: dict[str, RankRule] = {
    rule.name: rule
    for rule in (
        RankRule(
            "entropy",
            "smallest rank whose partial singular value entropy reaches eta of the total (LSSF)",
            PAPER_URL,
            entropy_rank,
        ),
        RankRule(
            "energy",
            "smallest rank whose squared singular values reach eta of the total energy",
            "https://en.wikipedia.org/wiki/Low-rank_approximation",
            _energy_rank,
        ),
        RankRule(
            "full",
            "every non-zero direction: P' @ delta = delta, the whole safety vector (RESTA)",
            "https://arxiv.org/abs/2402.11746",
            lambda s, eta: int(s.numel()),
        ),
    )
}


@dataclass(frozen=True)
class SubspaceBasis:
    """A way of finding the safety subspace, selected by ``PatchConfig.basis``."""

    name: str
    description: str
    reference: str
    see_also: tuple[str, ...] = ()


BASES: dict[str, SubspaceBasis] = {
    "delta-svd": SubspaceBasis(
        "delta-svd",
        "left singular vectors of the safety vector delta = W_aligned - W_reference",
        PAPER_URL,
    ),
    "activation": SubspaceBasis(
        "activation",
        "left singular vectors of W X^T: the output directions a layer uses on calibration "
        "prompts run through the aligned model (ActSVD); W the aligned weight or delta",
        ACTSVD_URL,
        see_also=(PAPER_URL,),
    ),
}


def get_rank_rule(name: str) -> RankRule:
    """The rank rule called ``name``; an unknown name fails with the list of known ones."""
    if name not in RANK_RULES:
        raise ConfigError(f"unknown rank rule {name!r}; known: {', '.join(sorted(RANK_RULES))}")
    return RANK_RULES[name]

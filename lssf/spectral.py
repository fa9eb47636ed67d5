"""The LSSF maths: safety spectra, entropy-ranked rank selection and the fused low-rank update.

Small pure functions on tensors, no I/O. Notation follows Zhou et al. (ACL 2025,
arXiv 2602.00038): ``delta = W_aligned - W_reference`` has singular values ``s_1 >= s_2 >= ...``,
``p_i = s_i^2 / sum_j s_j^2`` and partial entropy ``H_rho = -sum_{i<=rho} p_i log p_i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Singular values at or below s_1 * RELATIVE_ZERO are zero (the paper's rule, exact in float64).
RELATIVE_ZERO = 1e-12


def zero_tolerance(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Relative size under which a computed singular value is rounding noise.

    The usual numerical-rank tolerance ``max(m, n) * eps`` (as in ``torch.linalg.matrix_rank``),
    never below ``RELATIVE_ZERO``. In float32 a rank-1 delta otherwise shows ~min(m, n) noise
    values near 1e-7 * s_1 whose entropy, against H_n of almost 0, would inflate its rank.
    """
    return max(RELATIVE_ZERO, max(shape) * torch.finfo(dtype).eps)


@dataclass(frozen=True)
class Spectrum:
    """Left singular vectors and singular values of one safety vector.

    u: (d_out, k) float32, columns orthonormal, ordered like ``s``.
    s: (k,) float64, descending, only values above ``s_1 * zero_tolerance``.
    """

    u: torch.Tensor
    s: torch.Tensor


def safety_spectrum(delta: torch.Tensor) -> Spectrum:
    """Thin SVD of ``delta: (d_out, d_in)``, keeping the left singular vectors.

    A wide matrix is decomposed in its tall (transposed) form, 2-3x faster on CPU; its left
    singular vectors are then the right singular vectors of the transpose.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    work = delta if delta.dtype == torch.float64 else delta.float()
    if work.shape[0] < work.shape[1]:
        _, s, vh = torch.linalg.svd(work.T, full_matrices=False)
        u = vh.T
    else:
        u, s, _ = torch.linalg.svd(work, full_matrices=False)
    s64 = s.double().cpu()
    tol = zero_tolerance(tuple(work.shape), work.dtype)
    keep = int((s64 > s64[0] * tol).sum()) if s64.numel() and s64[0] > 0 else 0
    return Spectrum(u=u[:, :keep].contiguous(), s=s64[:keep])


def energy_fractions(s: torch.Tensor) -> torch.Tensor:
    """``p_i = s_i^2 / sum_j s_j^2`` in float64; empty for an empty spectrum."""
    e = s.double() ** 2
    total = e.sum()
    return e / total if total > 0 else e


def partial_entropies(p: torch.Tensor) -> torch.Tensor:
    """Cumulative ``H_rho = -sum_{i<=rho} p_i log p_i`` for rho = 1..n (``0 log 0 = 0``)."""
    terms = torch.where(p > 0, -p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), 0.0)
    return torch.cumsum(terms, dim=0)


def entropy_rank(s: torch.Tensor, eta: float) -> int:
    """Safety-critical rank ``r = min{rho : H_rho / H_n >= eta}``.

    With ``H_n == 0`` (at most one non-zero value) the rank is the count of non-zero values.
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    n = int(s.numel())
    h = partial_entropies(energy_fractions(s))
    if n == 0 or h[-1] <= 0:
        return n
    ratio = h / h[-1]
    # Rounding can leave the last ratio a hair under 1.0; eta = 1 must still select n.
    hits = torch.nonzero(ratio >= eta - 1e-12)
    return int(hits[0]) + 1 if hits.numel() else n


def entropy_ratio(s: torch.Tensor, rank: int) -> float:
    """``H_r / H_n``; 1.0 when the total entropy is zero (nothing left to capture)."""
    h = partial_entropies(energy_fractions(s))
    if rank == 0 or h.numel() == 0 or h[-1] <= 0:
        return 1.0 if rank > 0 or h.numel() == 0 else 0.0
    return float(h[rank - 1] / h[-1])


def energy_kept(s: torch.Tensor, rank: int) -> float:
    """``sum_{i<=r} p_i``: the share of the safety vector's energy the projection keeps."""
    p = energy_fractions(s)
    return float(p[:rank].sum()) if rank > 0 else 0.0


def direction_weights(s: torch.Tensor, rank: int, weight_top: float) -> torch.Tensor:
    """``a_i = 1 + (a_1 - 1) (s_i - s_r) / (s_1 - s_r)`` for i <= r, float64 ``(rank,)``.

    The strongest safety direction gets ``a_1``, the weakest kept one 1, linear in between;
    if ``s_1 == s_r`` every direction gets ``a_1``.
    """
    if rank == 0:
        return torch.zeros(0, dtype=torch.float64)
    kept = s[:rank].double()
    spread = kept[0] - kept[-1]
    if spread <= 0:
        return torch.full((rank,), float(weight_top), dtype=torch.float64)
    return 1.0 + (weight_top - 1.0) * (kept - kept[-1]) / spread


def safety_factors(
    delta: torch.Tensor, u: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of ``P' @ delta`` with ``P' = U' U'^T`` and ``U' = U_r diag(a)``.

    delta: (d_out, d_in); u: (d_out, r) orthonormal; weights: (r,).
    Returns ``U': (d_out, r)`` and ``C = U'^T delta: (r, d_in)``, both float32.
    """
    u_w = (u.double() * weights.to(u.device).double()).float()
    c = u_w.T @ delta.float()
    return u_w.contiguous(), c.contiguous()


def fused_weight(
    w_ft: torch.Tensor, u: torch.Tensor, c: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``W_ft + alpha * U' C`` computed in float32 and cast back to ``w_ft``'s dtype.

    w_ft: (d_out, d_in); u: (d_out, r); c: (r, d_in).
    """
    if u.shape[1] == 0 or alpha == 0.0:
        return w_ft.clone()
    out = torch.addmm(w_ft.float(), u.float(), c.float(), alpha=alpha)
    return out.to(w_ft.dtype)


def projection(u: torch.Tensor) -> torch.Tensor:
    """``P' = U' U'^T: (d_out, d_out)``; for tests and small matrices only."""
    return u @ u.T

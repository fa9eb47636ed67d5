"""The top-r safety subspace without a full SVD: exact singular values, certified vectors.

The rank rules need every singular value but only ``r`` left singular vectors are kept. So:

1. all singular values from ``svdvals`` of the tall form (a quarter to a half of a full SVD);
2. the rank from the unchanged rule, accepted only if it does not move when every value is
   shifted by its possible rounding error (else the full SVD's own values decide, as today);
3. the top-r left vectors by block subspace iteration in float64, block size and iteration
   count planned from the exact spectrum (convergence goes as ``s_{k+1} / s_r`` per pass);
4. an a-posteriori certificate, no full SVD needed: the Ritz values must match the exact
   singular values, and Wedin's bound ``sqrt(2) ||delta V_r - U_r S_r||_F / (S_r - s_{r+1})``
   on ``||P' - P||_F`` (which bounds ``||P' delta - P delta|| / ||P delta||``) must be tiny.

Anything uncertified (flat or noisy spectra, near-ties at the cut, ``r`` a large share of the
matrix) falls back to :func:`lssf.spectral.safety_spectrum`, today's exact path, so correctness
never rests on the shortcut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lssf.spectral import Spectrum, safety_spectrum, zero_tolerance

# A computed singular value may be off by this many eps * s_1 (svd vs svdvals vs float64: up to
# ~3.5 eps measured on 1024-2816 shapes; 8 leaves a margin).
VALUE_ERROR = 8.0
# Certified bound on the projected update's relative error (the criterion is 1e-5).
CERTIFIED = 1e-6
# Beyond this share of min(m, n) for the block, a full SVD is cheaper than iterating.
MAX_BLOCK_FRACTION = 0.25
MAX_ITERATIONS = 12
OVERSAMPLING = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class LowRank:
    """The kept spectrum and rank of one safety vector, and how they were found.

    spectrum.u: (d_out, rank) float32; spectrum.s: (k,) float64, every value above tolerance.
    fallback: why the full SVD was used (None: the certified fast path).
    """

    spectrum: Spectrum
    rank: int
    fallback: str | None


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Every singular value of ``delta: (d_out, d_in)``, ``(min(d_out, d_in),)`` float64 CPU.

    ``svdvals`` of the tall orientation, the cheaper one (LAPACK reduces it by QR first).
    """
    work = delta if delta.dtype == torch.float64 else delta.float()
    tall = work if work.shape[0] >= work.shape[1] else work.T
    return torch.linalg.svdvals(tall).double().cpu()


def kept(s_all: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The values above ``s_1 * zero_tolerance``, the same rule as ``safety_spectrum``."""
    if not s_all.numel() or s_all[0] <= 0:
        return s_all[:0]
    tol = zero_tolerance(shape, dtype)
    return s_all[: int((s_all > s_all[0] * tol).sum())]


def rank_is_stable(select: Callable[[torch.Tensor], int], s: torch.Tensor, err: float) -> bool:
    """True when ``select`` gives the same rank with every value moved by up to ``err``.

    s: (k,) float64 descending. The two extreme moves push the kept head and the tail apart
    and together; if neither changes the rank, rounding in ``s`` cannot have chosen it.
    """
    rank = select(s)
    head = torch.arange(s.numel()) < rank
    apart = torch.where(head, s + err, (s - err).clamp_min(0.0))
    together = torch.where(head, (s - err).clamp_min(0.0), s + err)
    return select(apart) == rank and select(together) == rank


def block_plan(s_all: torch.Tensor, rank: int, target: float = 1e-9) -> tuple[int, int] | None:
    """Block size ``k`` and passes ``q`` for the top-``rank`` subspace; None: use a full SVD.

    s_all: (n,) float64, every singular value. After ``q`` passes the subspace's error goes
    as ``(s_{k+1}/s_r)^(2q+1)``; the cheapest ``k * q`` reaching ``target`` within the size
    limits wins (the certificate, not this estimate, decides whether the result is kept).
    """
    n = s_all.numel()
    best: tuple[int, int] | None = None
    for p in OVERSAMPLING:
        k = rank + p
        if k > MAX_BLOCK_FRACTION * n:
            break
        rate = float(s_all[k] / s_all[rank - 1])
        q = 1 if rate <= 0.0 else math.ceil((math.log(target) / math.log(rate) - 1.0) / 2.0)
        if rate < 1.0 and q <= MAX_ITERATIONS and (best is None or k * q < best[0] * best[1]):
            best = (k, max(q, 1))
    return best


def range_basis(delta: torch.Tensor, k: int, passes: int, seed: int = 0) -> torch.Tensor:
    """Orthonormal ``Q: (d_out, k)`` spanning ``(delta delta^T)^passes delta @ Omega``.

    delta: (d_out, d_in) float64. Re-orthonormalised after every product, so float64 keeps
    directions far below s_1 (randomized block subspace iteration, Halko et al. 2011, 4.5).
    """
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(delta.shape[1], k, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(delta @ omega.to(delta.device))
    delta_t = delta.T.contiguous()  # a row-major copy: the transposed product runs ~2x faster
    for _ in range(passes):
        z, _ = torch.linalg.qr(delta_t @ q)
        q, _ = torch.linalg.qr(delta @ z)
    return q


def ritz(delta: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on ``span(Q)``: ``U: (d_out, k)``, values ``(k,)``, ``V: (d_in, k)``.

    With ``B = Q^T delta = Ub S V^T`` and ``U = Q Ub``, ``delta^T U = V S`` holds exactly.
    """
    b = q.T @ delta
    v, sv, ubt = torch.linalg.svd(b.T, full_matrices=False)
    return q @ ubt.T, sv, v


def update_error_bound(
    delta: torch.Tensor, u: torch.Tensor, sv: torch.Tensor, v: torch.Tensor, s_next: float
) -> float:
    """Wedin's bound on ``||U U^T - P_r||_F`` for the top ``r = u.shape[1]`` directions.

    delta: (d_out, d_in) float64; u: (d_out, r), sv: (r,), v: (d_in, r) from :func:`ritz`;
    s_next: the exact ``s_{r+1}``. The relative error of the projected update is below it.
    """
    gap = float(sv[-1]) - s_next
    if gap <= 0:
        return math.inf
    residual = torch.linalg.matrix_norm(delta @ v - u * sv)
    return math.sqrt(2.0) * float(residual) / gap


def certified_vectors(
    delta: torch.Tensor, s_all: torch.Tensor, rank: int, err: float
) -> tuple[torch.Tensor | None, str]:
    """The top-``rank`` left singular vectors ``(d_out, rank)`` float32, or None and why not.

    delta: (d_out, d_in); s_all: every exact singular value; err: their rounding error.
    """
    plan = block_plan(s_all, rank)
    if plan is None:
        return None, "rank too large or spectrum too flat for a small block"
    d64 = delta.double()
    u, sv, v = ritz(d64, range_basis(d64, *plan))
    u, sv, v = u[:, :rank], sv[:rank].cpu(), v[:, :rank]
    if bool(((sv - s_all[:rank]).abs() > err + 1e-9 * s_all[:rank]).any()):
        return None, "Ritz values do not match the singular values"
    bound = update_error_bound(d64, u, sv.to(d64.device), v, float(s_all[rank]) + err)
    if bound > CERTIFIED:
        return None, f"error bound {bound:.1e} above {CERTIFIED:.0e}"
    return u.float().contiguous(), ""


def top_subspace(delta: torch.Tensor, select: Callable[[torch.Tensor], int]) -> LowRank:
    """Kept spectrum, rank ``select(s)`` and its ``rank`` left vectors of ``delta: (d_out, d_in)``.

    Same rank and (to ``CERTIFIED``) same projection as the full SVD path; falls back to it
    whenever either is not certain.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    s_all = singular_values(delta)
    s = kept(s_all, tuple(delta.shape), dtype)
    rank = select(s)
    if rank == 0:
        return LowRank(Spectrum(delta.new_zeros(delta.shape[0], 0).float(), s), 0, None)
    err = VALUE_ERROR * torch.finfo(dtype).eps * float(s_all[0])
    why = "rank moves within rounding of the values"
    u = None
    if rank_is_stable(select, s, err) and rank < s_all.numel():
        u, why = certified_vectors(delta, s_all, rank, err)
    if u is None:
        spec = safety_spectrum(delta)
        rank = select(spec.s)
        return LowRank(Spectrum(spec.u[:, :rank], spec.s), rank, why)
    return LowRank(Spectrum(u, s), rank, None)

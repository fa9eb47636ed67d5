"""The top-r safety subspace without a full SVD: exact singular values, certified vectors.

The rank rules need every singular value but only ``r`` left singular vectors are kept. So:

1. all singular values: up to ``GRAM_MAX_SIDE`` on the short side, the eigenvalues of the
   float64 Gram matrix ``delta delta^T`` (or ``delta^T delta``) with their rigorous error
   bound (Weyl); beyond it ``svdvals`` of the tall form (float64 deltas, GPUs; on CPU a
   larger delta takes the full SVD at once, ``FULL_SVD_SIDE``);
2. the rank from the unchanged rule, accepted only if it does not move when every value is
   shifted by its possible error, or borderline values near the zero cut are dropped (else the
   full SVD's own values decide, as before);
3. the top-r left vectors by block subspace iteration in float64, block size and iteration
   count planned from the exact spectrum (convergence goes as ``s_{k+1} / s_r`` per pass); on
   the Gram route the passes multiply by the small Gram matrix, not by ``delta``, and a tail
   too flat for a few passes takes every vector from one ``eigh`` of that Gram instead;
4. an a-posteriori certificate on ``delta`` itself, no full SVD needed: the Ritz values must
   match the exact singular values, and Wedin's bound
   ``sqrt(2) ||delta V_r - U_r S_r||_F / (S_r - s_{r+1})`` on ``||P' - P||_F`` (which bounds
   ``||P' delta - P delta|| / ||P delta||``) must be tiny.

Anything uncertified (flat or noisy spectra, near-ties at the cut, ``r`` a large share of the
matrix) falls back to :func:`lssf.spectral.safety_spectrum`, the exact path, so correctness
never rests on the shortcut. Every step is single-threaded-deterministic: the same input gives
the same bits whichever thread runs it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lssf.config import PatchConfig
from lssf.errors import NonFiniteError
from lssf.methods import get_rank_rule
from lssf.patch import TensorRecord
from lssf.spectral import (
    Spectrum,
    direction_weights,
    energy_kept,
    entropy_ratio,
    safety_factors,
    safety_spectrum,
    zero_tolerance,
)
from lssf.st_io import is_finite

log = logging.getLogger(__name__)

# A computed singular value may be off by this many eps * s_1 (svd vs svdvals vs float64: up to
# ~3.5 eps measured on 1024-2816 shapes; 8 leaves a margin).
VALUE_ERROR = 8.0
# Certified bound on the projected update's relative error (the criterion is 1e-5).
CERTIFIED = 1e-6
# Beyond this share of min(m, n) for the block, a full SVD is cheaper than iterating.
MAX_BLOCK_FRACTION = 0.25
MAX_ITERATIONS = 12
OVERSAMPLING = (8, 16, 32, 64, 128)
# Short side up to which the values come from float64 Gram + eigvalsh (numpy), cheaper than
# float32 svdvals here (2048x5632: 2.4 s vs 6.0 s, one thread); the passes then multiply the
# small (n, n) Gram instead of delta.
GRAM_MAX_SIDE = 2048
# Beyond this short side, on CPU, the values alone cost most of a full SVD (4096x4096, one
# thread: svdvals 25.2 s, svd 29.4 s) and noise-floor ranks need its vectors: take it at once.
FULL_SVD_SIDE = 2048


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


def gram_matrix(d64: torch.Tensor) -> torch.Tensor:
    """The small float64 Gram matrix ``(n, n)``, ``n = min(d_out, d_in)``, of ``d64``.

    ``delta delta^T`` when ``d_out <= d_in`` (its eigenvectors are the left singular vectors),
    else ``delta^T delta`` (the right ones). On CPU through numpy, whose BLAS spots the
    self-product (``syrk``, half the work) and beat torch's 0.21 s by 0.14 s at 1024x2816.
    """
    left = d64.shape[0] <= d64.shape[1]
    if d64.device.type == "cpu":
        a = d64.numpy()
        return torch.from_numpy(a @ a.T if left else a.T @ a)
    return d64 @ d64.T if left else d64.T @ d64


def _eigh(gram: torch.Tensor, vectors: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ascending eigenvalues (and eigenvectors) of the symmetric float64 ``gram: (n, n)``.

    On CPU numpy's LAPACK: 0.075 s against torch's 0.13 s for n = 1024 here (both release
    the GIL); elsewhere torch.
    """
    if gram.device.type != "cpu":
        if vectors:
            return torch.linalg.eigh(gram)
        return torch.linalg.eigvalsh(gram), None
    if vectors:
        w, v = np.linalg.eigh(gram.numpy())
        return torch.from_numpy(w), torch.from_numpy(v)
    return torch.from_numpy(np.linalg.eigvalsh(gram.numpy())), None


def gram_values(d64: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every singular value ``(n,)`` float64 descending from ``gram``, and each one's error bound.

    Forming ``gram`` and ``eigvalsh`` move each ``s_i^2`` by at most
    ``E = 2 (d_out + d_in) eps64 ||delta||_F^2`` (Weyl); so ``|s~_i - s_i| <= min(sqrt(E),
    E / s~_i)``. For float32 inputs this is far below float32's own rounding of the values.
    """
    lam = _eigh(gram, vectors=False)[0].flip(0).clamp_min(0.0)
    s = lam.sqrt()
    total = float(torch.trace(gram))
    e = 2.0 * sum(d64.shape) * torch.finfo(torch.float64).eps * total
    err = torch.full_like(s, math.sqrt(e))
    positive = s > 0
    err[positive] = torch.minimum(err[positive], e / s[positive])
    return s.cpu(), err.cpu()


def kept(s_all: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The values above ``s_1 * zero_tolerance``, the same rule as ``safety_spectrum``."""
    if not s_all.numel() or s_all[0] <= 0:
        return s_all[:0]
    tol = zero_tolerance(shape, dtype)
    return s_all[: int((s_all > s_all[0] * tol).sum())]


def rank_is_stable(
    select: Callable[[torch.Tensor], int], s: torch.Tensor, err: float | torch.Tensor
) -> bool:
    """True when ``select`` gives the same rank with every value moved by up to ``err``.

    s: (k,) float64 descending; err: a bound for all values, or ``(>= k,)`` one per value. The
    two extreme moves push the kept head and the tail apart and together; if neither changes
    the rank, rounding in ``s`` cannot have chosen it.
    """
    if isinstance(err, torch.Tensor):
        err = err[: s.numel()]
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


def gram_basis(
    d64: torch.Tensor, gram: torch.Tensor, k: int, passes: int, seed: int = 0
) -> torch.Tensor:
    """Orthonormal ``Q: (d_out, k)``, the same power of the spectrum as :func:`range_basis`.

    d64: (d_out, d_in) float64; gram: its :func:`gram_matrix`. ``passes + 1`` products with
    ``gram`` (n x n, cheap) give ``s^(2 passes + 2)``; the right-side Gram's basis is mapped
    to the left by one product with ``delta``.
    """
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(gram.shape[0], k, generator=gen, dtype=torch.float64)
    q = omega.to(gram.device)
    for _ in range(passes + 1):
        q, _ = torch.linalg.qr(gram @ q)
    if d64.shape[0] > d64.shape[1]:
        q, _ = torch.linalg.qr(d64 @ q)
    return q


def gram_eigh_basis(d64: torch.Tensor, gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal ``Q: (d_out, rank)`` from the top eigenvectors of ``gram`` (``eigh``).

    For spectra too flat beyond the cut for a few passes: one float64 ``eigh`` of the small
    Gram costs about half a float32 SVD of ``delta`` (measured at 1024x2816).
    """
    _, vecs = _eigh(gram, vectors=True)
    q = vecs[:, -rank:].flip(1)
    if d64.shape[0] > d64.shape[1]:
        q, _ = torch.linalg.qr(d64 @ q)
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
    d64: torch.Tensor,
    s_all: torch.Tensor,
    rank: int,
    err: torch.Tensor,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, str]:
    """The top-``rank`` left singular vectors ``(d_out, rank)`` float32, or None and why not.

    d64: (d_out, d_in) float64; s_all: every exact singular value; err: (n,) their error
    bounds; gram: the :func:`gram_matrix` when the values came from it (cheaper passes).
    """
    plan = block_plan(s_all, rank)
    if gram is not None and plan is None and rank <= MAX_BLOCK_FRACTION * s_all.numel():
        q = gram_eigh_basis(d64, gram, rank)  # flat beyond the cut: every vector of the Gram
    elif plan is None:
        return None, "rank too large or spectrum too flat for a small block"
    else:
        q = range_basis(d64, *plan) if gram is None else gram_basis(d64, gram, *plan)
    u, sv, v = ritz(d64, q)
    u, sv, v = u[:, :rank], sv[:rank].cpu(), v[:, :rank]
    if bool(((sv - s_all[:rank]).abs() > err[:rank] + 1e-9 * s_all[:rank]).any()):
        return None, "Ritz values do not match the singular values"
    s_next = float(s_all[rank] + err[rank])
    bound = update_error_bound(d64, u, sv.to(d64.device), v, s_next)
    if bound > CERTIFIED:
        return None, f"error bound {bound:.1e} above {CERTIFIED:.0e}"
    return u.float().contiguous(), ""


def exact_values(
    delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Every singular value of ``delta: (d_out, d_in)`` (float64, descending), their error
    bounds ``(n,)`` against the exact ones, and (Gram route) ``delta`` in float64 and its Gram.

    The bound covers what a float32 SVD may differ by (``VALUE_ERROR`` eps32 s_1), plus the
    route's own error: so a rank stable under it is the full SVD's rank too.
    """
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    d64 = gram = None
    if dtype == torch.float32 and min(delta.shape) <= GRAM_MAX_SIDE:
        d64 = delta.double()
        gram = gram_matrix(d64)
        s_all, own = gram_values(d64, gram)
    else:
        s_all = singular_values(delta)
        own = torch.zeros_like(s_all)
    s1 = float(s_all[0]) if s_all.numel() else 0.0
    return s_all, own + VALUE_ERROR * torch.finfo(dtype).eps * s1, d64, gram


def cut_is_stable(
    select: Callable[[torch.Tensor], int], s_all: torch.Tensor, err: torch.Tensor, tol: float
) -> bool:
    """True when values within ``err`` of the zero cut ``s_1 * tol`` cannot change the rank."""
    cut = float(s_all[0]) * tol
    sure, maybe = s_all[s_all - err > cut], s_all[s_all + err > cut]
    return sure.numel() == maybe.numel() or select(sure) == select(maybe)


def full_svd(delta: torch.Tensor, select: Callable[[torch.Tensor], int], why: str) -> LowRank:
    """The exact path: a full SVD's values decide the rank, its vectors are kept."""
    spec = safety_spectrum(delta)
    rank = select(spec.s)
    return LowRank(Spectrum(spec.u[:, :rank], spec.s), rank, why)


def top_subspace(delta: torch.Tensor, select: Callable[[torch.Tensor], int]) -> LowRank:
    """Kept spectrum, rank ``select(s)`` and its ``rank`` left vectors of ``delta: (d_out, d_in)``.

    Same rank and (to ``CERTIFIED``) same projection as the full SVD path; falls back to it
    whenever either is not certain.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    if delta.device.type == "cpu" and min(delta.shape) > FULL_SVD_SIDE:
        return full_svd(delta, select, f"short side over {FULL_SVD_SIDE}")
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    s_all, err, d64, gram = exact_values(delta)
    s = kept(s_all, tuple(delta.shape), dtype)
    rank = select(s)
    if rank == 0:
        return LowRank(Spectrum(delta.new_zeros(delta.shape[0], 0).float(), s), 0, None)
    tol = zero_tolerance(tuple(delta.shape), dtype)
    if not (rank_is_stable(select, s, err) and cut_is_stable(select, s_all, err, tol)):
        return full_svd(delta, select, "rank moves within rounding of the values")
    if rank == s_all.numel():
        return full_svd(delta, select, "every direction kept")
    d64 = delta.double() if d64 is None else d64
    u, why = certified_vectors(d64, s_all, rank, err, gram)
    return LowRank(Spectrum(u, s), rank, None) if u is not None else full_svd(delta, select, why)


# -- one target tensor: the delta and its factors (shared by every extraction basis) --------


def safety_delta(name: str, aligned: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``delta = W_aligned - W_reference`` in float32 whatever the stored dtype."""
    for label, t in (("aligned", aligned), ("reference", reference)):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"tensor {name!r} of the {label} model has {bad} NaN/Inf values")
    delta = aligned.float() - reference.float()
    if not torch.isfinite(delta).all():
        raise NonFiniteError(f"safety vector of tensor {name!r} overflows float32 (NaN/Inf)")
    return delta


def spectrum_stats(s: torch.Tensor, rank: int) -> dict[str, float | int]:
    """The record fields that describe the spectrum ``s: (k,)`` that set ``rank``."""
    return {
        "entropy_ratio": entropy_ratio(s, rank),
        "energy_kept": energy_kept(s, rank),
        "n_nonzero": int(s.numel()),
        "top_singular_value": float(s[0]) if s.numel() else 0.0,
    }


def checked_factors(
    delta: torch.Tensor, basis: torch.Tensor, s: torch.Tensor, rank: int, weight_top: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U' = basis * weights``, ``C = U'^T delta`` for ``basis: (d_out, rank)``, both finite."""
    u, c = safety_factors(delta, basis, direction_weights(s, rank, weight_top))
    if not (is_finite(u) and is_finite(c)):
        raise NonFiniteError(
            f"safety factors of a {list(delta.shape)} tensor overflow float32 (NaN/Inf); "
            f"weight_top={weight_top} is too large"
        )
    return u, c


def patch_tensor(
    delta: torch.Tensor, config: PatchConfig
) -> tuple[torch.Tensor, torch.Tensor, TensorRecord]:
    """Steps 2-4 of LSSF for one safety vector ``delta: (d_out, d_in)``.

    Returns ``U': (d_out, r)``, ``C: (r, d_in)`` (float32, CPU) and the tensor's record.
    Ranked rules take the certified low-rank path (``lssf/lowrank.py``: same ranks, same
    projection to 1e-6, full SVD whenever that is not certain); ``full`` needs every vector.
    """
    rule = get_rank_rule(config.rank_rule)

    def select(s: torch.Tensor) -> int:
        rank = rule.select(s, config.eta)
        return rank if config.max_rank is None else min(rank, config.max_rank)

    if config.rank_rule == "full":
        spec = safety_spectrum(delta)
        rank = select(spec.s)
    else:
        found = top_subspace(delta, select)
        spec, rank = found.spectrum, found.rank
        if found.fallback:
            log.debug("%s delta: full SVD (%s)", list(delta.shape), found.fallback)
    u, c = checked_factors(delta, spec.u[:, :rank], spec.s, rank, config.weight_top)
    record = TensorRecord(
        shape=tuple(delta.shape),
        rank=rank,
        delta_norm=float(torch.linalg.vector_norm(delta.double())),
        **spectrum_stats(spec.s, rank),
    )
    return u.cpu(), c.cpu(), record

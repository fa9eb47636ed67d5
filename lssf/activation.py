"""The activation basis: output directions a layer uses while the aligned model refuses (ActSVD).

For weight ``W: (d_out, d_in)`` and calibration inputs ``X: (T, d_in)``, the basis is the left
singular vectors of ``W X^T`` (Wei et al. 2024, arXiv 2402.05162): the eigenvectors of
``W G W^T``, singular values ``sqrt(eigenvalues)``. The rows of ``X`` are the layer's inputs at
the positions that emit the aligned model's answer (teacher-forced: the last prompt token up to
the answer's second-to-last token), as ActSVD counts only its calibration answers' tokens.
``G = sum_t w_t x_t x_t^T`` with ``w_t = 1 / (N * n_i)`` for the ``n_i`` counted positions of
prompt ``i`` of ``N``: the mean over prompts of each answer's mean Gram, so every refusal weighs
the same whatever its length; only ``G`` is held. ``activation_tokens: prompt`` keeps the v1
reading: every prompt token, no answer, ``G = X^T X / T``.
"""

from __future__ import annotations

import torch

from lssf.spectral import Spectrum

# float64 eigenvalues of a Gram product are good to ~eps * lambda_1, so the singular values
# (their square roots) only to ~sqrt(eps) * s_1: below that they are rounding noise.
EIG_EPS = torch.finfo(torch.float64).eps


def answer_weights(prompt_lens: list[int], answer_lens: list[int]) -> torch.Tensor:
    """Square roots of the Gram's token weights, ``(T,)`` float64 over the packed sequences.

    Sequence ``i`` is ``prompt_lens[i]`` prompt tokens then ``answer_lens[i] >= 1`` answer tokens;
    its ``n_i = answer_lens[i]`` positions that predict an answer token (the last prompt token
    on) weigh ``1 / (N * n_i)``, every other position 0, so the weights sum to 1.
    """
    if len(prompt_lens) != len(answer_lens) or not prompt_lens:
        raise ValueError(f"{len(prompt_lens)} prompts and {len(answer_lens)} answers")
    if min(prompt_lens) < 1 or min(answer_lens) < 1:
        raise ValueError("every prompt and every answer needs at least one token")
    parts = []
    for p, a in zip(prompt_lens, answer_lens, strict=True):
        w = torch.zeros(p + a, dtype=torch.float64)
        w[p - 1 : p + a - 1] = 1.0 / (len(prompt_lens) * a)
        parts.append(w)
    return torch.cat(parts).sqrt()


def prompt_weights(lengths: list[int]) -> torch.Tensor:
    """Square roots of ``1 / T`` for each of the ``T = sum(lengths)`` tokens.

    ``G = X^T X / T`` over every prompt token (``activation_tokens: prompt``, the v1 reading).
    """
    total = sum(lengths)
    if total <= 0:
        raise ValueError(f"no calibration token in sequences of lengths {lengths}")
    return torch.full((total,), 1.0 / total, dtype=torch.float64).sqrt()


def output_covariance(w: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``W G W^T: (d_out, d_out)`` in float64, symmetrised; w: (d_out, d_in), gram: (d_in, d_in)."""
    if w.ndim != 2 or gram.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"weight {tuple(w.shape)} and Gram {tuple(gram.shape)} do not match")
    w64 = w.double()
    m = w64 @ gram.double() @ w64.T
    return (m + m.T) / 2  # rounding leaves it a hair asymmetric; eigh reads one triangle


def activation_spectrum(w: torch.Tensor, gram: torch.Tensor) -> Spectrum:
    """Left singular vectors and values of ``W X^T`` from ``gram = X^T X`` (weighted or not).

    w: (d_out, d_in); gram: (d_in, d_in). Returns ``u: (d_out, k)`` float32 orthonormal and
    ``s: (k,)`` float64 descending, keeping only values above ``s_1 * sqrt(d_out * eps)``
    (tiny negative eigenvalues from rounding are clamped to zero first).
    """
    evals, evecs = torch.linalg.eigh(output_covariance(w, gram))
    evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
    s = evals.sqrt().cpu()
    tol = (w.shape[0] * EIG_EPS) ** 0.5
    keep = int((s > s[0] * tol).sum()) if s.numel() and s[0] > 0 else 0
    return Spectrum(u=evecs[:, :keep].float().contiguous(), s=s[:keep])


def captured_energy(u: torch.Tensor, delta: torch.Tensor) -> float:
    """``||U^T delta||_F^2 / ||delta||_F^2``: the share of the safety vector inside span(U).

    u: (d_out, r) orthonormal; delta: (d_out, d_in). 1.0 for a zero delta.
    """
    total = float(torch.linalg.vector_norm(delta.double()) ** 2)
    if total == 0.0:
        return 1.0
    kept = float(torch.linalg.vector_norm(u.double().T @ delta.double()) ** 2)
    return kept / total

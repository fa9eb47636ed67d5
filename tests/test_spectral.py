"""Properties of the LSSF maths on known spectra."""

from __future__ import annotations

import math

import pytest
import torch

from lssf.config import PatchConfig
from lssf.errors import ConfigError
from lssf.lowrank import patch_tensor
from lssf.methods import get_rank_rule
from lssf.spectral import (
    direction_weights,
    energy_fractions,
    energy_kept,
    entropy_rank,
    entropy_ratio,
    fused_weight,
    partial_entropies,
    projection,
    safety_factors,
    safety_spectrum,
)
from lssf.synthetic import low_rank


def matrix_with(spectrum: list[float], shape=(40, 24), seed=0) -> torch.Tensor:
    return low_rank(shape, spectrum, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [1, 4, 10])
@pytest.mark.parametrize("eta", [0.1, 0.5, 0.85, 1.0])
def test_equal_singular_values_give_ceil_eta_n(n, eta):
    # p_i = 1/n so H_rho / H_n = rho / n exactly; n = 1 has H_n = 0 and rank 1.
    s = torch.full((n,), 3.0, dtype=torch.float64)
    expected = 1 if n == 1 else math.ceil(eta * n - 1e-9)
    assert entropy_rank(s, eta) == expected


def test_one_dominant_value_needs_more_than_one_direction_only_when_tail_has_entropy():
    # Entropy counts spread, not energy: a dominant value with a long flat tail keeps the tail.
    s = torch.tensor([100.0] + [1.0] * 50, dtype=torch.float64)
    assert entropy_rank(s, 0.85) > 1
    assert get_rank_rule("energy").select(s, 0.85) == 1
    # A lone dominant direction with nothing beside it: rank 1.
    assert entropy_rank(torch.tensor([5.0], dtype=torch.float64), 0.85) == 1


def test_zero_delta_gives_rank_zero_and_no_change():
    delta = torch.zeros(16, 8)
    u, c, rec = patch_tensor(delta, PatchConfig())
    assert rec.rank == 0 and u.shape == (16, 0) and c.shape == (0, 8)
    w = torch.randn(16, 8)
    assert torch.equal(fused_weight(w, u, c, 1.0), w)


def test_partial_entropy_matches_hand_computation():
    s = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    p = torch.tensor([4 / 6, 1 / 6, 1 / 6], dtype=torch.float64)
    h = -(p * p.log()).cumsum(0)
    assert torch.allclose(energy_fractions(s), p)
    assert torch.allclose(partial_entropies(p), h)
    # H_1/H_3 = 0.2703/0.8676 = 0.3116; H_2/H_3 = 0.6558 -> eta 0.5 needs 2, eta 0.7 needs 3.
    assert entropy_rank(s, 0.3) == 1
    assert entropy_rank(s, 0.5) == 2
    assert entropy_rank(s, 0.7) == 3
    assert entropy_ratio(s, 2) == pytest.approx(float(h[1] / h[2]))
    assert energy_kept(s, 2) == pytest.approx(5 / 6)


def test_entropy_rank_is_monotone_in_eta():
    s = torch.linspace(5, 0.1, 30, dtype=torch.float64)
    ranks = [entropy_rank(s, e) for e in (0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0)]
    assert ranks == sorted(ranks) and ranks[-1] == 30


def test_eta_out_of_range_is_refused():
    with pytest.raises(ValueError, match="eta"):
        entropy_rank(torch.ones(3, dtype=torch.float64), 0.0)
    with pytest.raises(ConfigError, match="known: energy, entropy, full"):
        get_rank_rule("bogus")


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])  # tall and wide (transposed) paths
def test_spectrum_recovers_known_values_and_orthonormal_u(shape):
    spectrum = [5.0, 3.0, 2.0, 0.5]
    spec = safety_spectrum(matrix_with(spectrum, shape))
    assert spec.s.numel() == 4  # values below s_1 * 1e-12 are dropped
    assert torch.allclose(spec.s, torch.tensor(spectrum, dtype=torch.float64), rtol=1e-5)
    eye = spec.u.T @ spec.u
    assert torch.allclose(eye, torch.eye(4), atol=1e-5)


def test_projection_is_idempotent_without_weighting():
    delta = matrix_with([4.0, 2.0, 1.0, 0.5, 0.25])
    u, _, rec = patch_tensor(delta, PatchConfig(eta=0.6))
    assert 0 < rec.rank < 5
    p = projection(u)
    assert torch.allclose(p @ p, p, atol=1e-5)
    assert torch.allclose(p, p.T, atol=1e-6)


def test_direction_weights_interpolate_from_a1_to_one():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    a = direction_weights(s, 3, 2.0)
    assert torch.allclose(a, torch.tensor([2.0, 1.5, 1.0], dtype=torch.float64))
    assert torch.equal(direction_weights(s, 3, 1.0), torch.ones(3, dtype=torch.float64))
    flat = torch.full((3,), 2.0, dtype=torch.float64)
    assert torch.equal(direction_weights(flat, 3, 1.7), torch.full((3,), 1.7, dtype=torch.float64))


def test_weighted_factors_equal_weighted_projection():
    # U' C = U_r diag(a) diag(a) U_r^T delta = P' delta.
    delta = matrix_with([4.0, 2.0, 1.0])
    spec = safety_spectrum(delta)
    weights = direction_weights(spec.s, 3, 2.0)
    u, c = safety_factors(delta, spec.u, weights)
    expected = spec.u @ torch.diag(weights.float() ** 2) @ spec.u.T @ delta
    assert torch.allclose(u @ c, expected, atol=1e-5)
    assert torch.allclose(u @ c, projection(u) @ delta, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_one_delta_has_rank_one_despite_rounding_noise(dtype):
    g = torch.Generator().manual_seed(1)
    delta = torch.outer(
        torch.randn(64, generator=g, dtype=dtype), torch.randn(32, generator=g, dtype=dtype)
    )
    spec = safety_spectrum(delta)
    assert spec.s.numel() == 1
    assert patch_tensor(delta, PatchConfig(eta=0.85))[2].rank == 1


def test_full_rule_adds_the_whole_safety_vector():
    delta = matrix_with([4.0, 2.0, 1.0, 0.1])
    u, c, rec = patch_tensor(delta, PatchConfig(rank_rule="full"))
    assert rec.rank == 4 and rec.energy_kept == pytest.approx(1.0)
    assert torch.allclose(u @ c, delta, atol=1e-5)


def test_max_rank_caps():
    delta = matrix_with([1.0] * 10)
    assert patch_tensor(delta, PatchConfig(max_rank=3))[2].rank == 3


def test_float32_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    w_ft = torch.randn(64, 48, generator=g, dtype=torch.float64)
    delta = low_rank((64, 48), [3.0, 2.0, 1.5, 1.0, 0.3], g).double()
    delta += 1e-3 * torch.randn(64, 48, generator=g, dtype=torch.float64)
    # float64 reference straight from the definition: P = U_r U_r^T, W + alpha P delta.
    u64, s64, _ = torch.linalg.svd(delta, full_matrices=False)
    r = entropy_rank(s64, 0.85)
    ref = w_ft + 1.5 * (u64[:, :r] @ u64[:, :r].T) @ delta
    u, c, rec = patch_tensor(delta.float(), PatchConfig(eta=0.85))
    assert rec.rank == r
    out = fused_weight(w_ft.float(), u, c, 1.5).double()
    rel = torch.linalg.norm(out - ref) / torch.linalg.norm(ref)
    assert rel < 1e-5


def test_bf16_in_bf16_out():
    w = torch.randn(32, 16).bfloat16()
    u, c, _ = patch_tensor(matrix_with([1.0, 0.5], (32, 16)), PatchConfig())
    out = fused_weight(w, u, c, 1.0)
    assert out.dtype == torch.bfloat16
    expected = (w.float() + u @ c).bfloat16()
    assert torch.equal(out, expected)

"""scripts/dose_response.py: its summaries on hand-made curves with known answers, and one
in-memory grid point against `lssf.fuse` to disk and `score_model` on the shipped organism."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dose_response.py"


@pytest.fixture(scope="module")
def dr():
    spec = importlib.util.spec_from_file_location("dose_response", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dose_response"] = module
    spec.loader.exec_module(module)
    return module


def m(refusal: float, task: float = 1.0, general: float = 0.5) -> dict[str, float]:
    return {"harmful_refusal": refusal, "task_accuracy": task, "general_accuracy": general}


FT, ALIGNED = m(0.2, 1.0, 0.5), m(1.0, 0.0, 0.6)


def test_gap_recovered_takes_the_best_alpha_within_the_utility_loss(dr):
    curve = {
        0.5: m(0.6, 1.0, 0.49),  # qualifies: (0.6 - 0.2) / 0.8 = 0.5
        1.0: m(0.8, 0.98, 0.48),  # qualifies at exactly 2 points each: 0.75
        2.0: m(1.0, 0.97, 0.5),  # task drops 3 points: excluded
        4.0: m(0.1, 0.2, 0.1),  # broken
    }
    assert dr.gap_recovered(curve, FT, ALIGNED, 0.02) == pytest.approx(0.75)
    assert dr.gap_recovered(curve, FT, ALIGNED, 0.05) == pytest.approx(1.0)
    assert dr.gap_alpha(curve, FT, ALIGNED, 0.02) == 1.0
    assert dr.gap_alpha({1.0: m(0.9, 0.5)}, FT, ALIGNED, 0.02) is None


def test_gap_recovered_is_zero_without_a_qualifying_alpha_and_none_without_a_gap(dr):
    curve = {1.0: m(0.9, 0.5), 2.0: m(1.0, 0.1)}
    assert dr.gap_recovered(curve, FT, ALIGNED, 0.02) == 0.0
    assert dr.gap_recovered(curve, FT, m(0.2), 0.02) is None


def test_gap_recovered_counts_a_two_point_drop_despite_rounding(dr):
    # 0.455 - 0.435 is 0.020000000000000018 in floating point: still a 2-point drop.
    ft = m(0.2, 1.0, 0.455)
    assert dr.gap_recovered({1.0: m(0.6, 1.0, 0.435)}, ft, ALIGNED, 0.02) == pytest.approx(0.5)


def test_matched_refusal_takes_the_first_alpha_reaching_it(dr):
    curve = {2.0: m(0.95, 0.6), 0.5: m(0.5), 1.0: m(0.9, 0.8), 4.0: m(0.2, 0.0)}
    assert dr.first_reaching(curve, 0.9) == 1.0
    assert dr.matched_points(curve, 0.9)["task_accuracy"] == 0.8
    assert dr.matched_points(curve, 0.99) is None


def test_paired_difference_counts_seeds_that_never_reach(dr):
    a = {0: {"task_accuracy": 0.9}, 1: {"task_accuracy": 0.7}, 2: None, 3: {"task_accuracy": 1}}
    b = {0: {"task_accuracy": 0.8}, 1: {"task_accuracy": 0.5}, 2: {"task_accuracy": 1}, 3: None}
    d = dr.paired_difference(a, b, "task_accuracy")
    assert d["n"] == 2 and d["a_never"] == 1 and d["b_never"] == 1
    assert d["mean"] == pytest.approx(0.15)
    assert 0.1 - 1e-12 <= d["lo"] <= d["mean"] <= d["hi"] <= 0.2 + 1e-12


def test_bootstrap_is_fixed_and_degenerate_on_constant_values(dr):
    assert dr.bootstrap_mean([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4, 0.4))
    assert dr.bootstrap_mean([0.0, 1.0, 0.5]) == dr.bootstrap_mean([0.0, 1.0, 0.5])
    assert all(x != x for x in dr.bootstrap_mean([]))  # NaN: no seed


@pytest.mark.slow
def test_in_memory_point_equals_fuse_to_disk_and_score_model(dr, organism, tmp_path):
    """One grid point (LSSF eta 0.85, alpha 0.75): the in-memory weights are the bytes
    `lssf.fuse` writes, and the metrics under both judges equal `score_model` on the fused
    folder (which reports the primary judge plus the strict refusal columns)."""
    import torch
    from safetensors.torch import load_file

    import lssf
    from evaluation.organism import score

    alpha = 0.75
    config = lssf.PatchConfig(rank_rule="entropy", eta=0.85)
    patch = lssf.extract(
        organism.aligned, reference=organism.base, out=tmp_path / "p", config=config, progress=False
    )
    lssf.fuse(organism.finetuned, patch, out=tmp_path / "fused", alpha=alpha, progress=False)
    factors, _ = dr.patch_factors(tmp_path / "p")
    fused = dr.Fused(organism.finetuned)
    model = fused.at(factors, alpha)
    on_disk = load_file(tmp_path / "fused" / "model.safetensors")
    for name, param in model.state_dict().items():
        assert torch.equal(param, on_disk[name]), name
    memory = dr.answers_for(model, fused.tok, organism.eval_dir, "heldout")
    rows = dr.eval_rows(organism.eval_dir, "heldout")
    primary, strict = (dr.judged(memory, rows, j) for j in (score.PRIMARY_JUDGE, "keyword-strict"))
    disk = score.score_model(tmp_path / "fused", organism.eval_dir, "heldout")
    assert disk == primary | {
        "harmful_refusal_strict": strict["harmful_refusal"],
        "over_refusal_strict": strict["over_refusal"],
    }
    # alpha 0 restores the fine-tune itself
    ft = load_file(Path(organism.finetuned) / "model.safetensors")
    for name, param in fused.at(factors, 0.0).state_dict().items():
        assert torch.equal(param, ft[name]), name

"""The activation basis on the aligned model's answers (issue #21): weights, generation, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from lssf import PatchConfig, extract
from lssf.activation import answer_weights
from lssf.calibration import encode_prompts, read_calibration, stop_ids
from lssf.checkpoint import Checkpoint
from lssf.errors import ConfigError
from lssf.llama_forward import (
    gram_update,
    greedy_answers,
    layer_forward,
    layer_weights,
    read_spec,
    rope_tables,
)
from tests.test_activation import ORGANISM, save_hf_model

CPU = torch.device("cpu")


def test_answer_weights_count_each_prompt_once_and_only_answer_positions():
    prompts, answers = [3, 1, 5], [2, 4, 1]
    w = answer_weights(prompts, answers) ** 2
    assert w.shape == (sum(prompts) + sum(answers),)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    start = 0
    for p, a in zip(prompts, answers, strict=True):
        seq = w[start : start + p + a]
        # the positions that emit the answer: the last prompt token up to the answer's last but one
        assert torch.all(seq[: p - 1] == 0) and seq[p + a - 1] == 0
        torch.testing.assert_close(seq[p - 1 : p + a - 1], torch.full((a,), 1 / (3 * a)).double())
        start += p + a
    with pytest.raises(ValueError, match="at least one token"):
        answer_weights([2], [0])


def test_weighted_gram_equals_the_gram_of_the_weighted_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=gen)
    scale = torch.tensor([0, 0.5, 0, 1, 2, 0, 0, 0.25, 0], dtype=torch.float64)
    grams = {"g": torch.zeros(5, 5, dtype=torch.float64)}
    gram_update(grams, "g", x, scale)
    xs = x.double() * scale[:, None]
    torch.testing.assert_close(grams["g"], xs.T @ xs)


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_answers_equal_transformers_generate(tmp_path, tied):
    save_hf_model(tmp_path, "llama", tied=tied, kv_heads=2, vocab=50)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (4, 9, 1)]
    stop = {7}
    with Checkpoint(tmp_path) as ckpt:
        spec = read_spec(json.loads((tmp_path / "config.json").read_text()), ckpt, "config")
        got = greedy_answers(ckpt, spec, prompts, 6, stop, CPU)
    for prompt, answer in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=7
            )
        assert answer == out[0, len(prompt) :].tolist()
        assert 1 <= len(answer) <= 6 and all(t not in stop for t in answer[:-1])


def test_a_cached_layer_continues_the_whole_sequence(tmp_path):
    save_hf_model(tmp_path, "llama", tied=False, kv_heads=2, vocab=50)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    with Checkpoint(tmp_path) as ckpt:
        spec = read_spec(json.loads((tmp_path / "config.json").read_text()), ckpt, "config")
        w, tables = layer_weights(ckpt, spec, 1, CPU), rope_tables(spec, 7, CPU)
        whole = layer_forward(x, w, spec, [7], tables, {})
        cache = [[None, None]]
        parts = [
            layer_forward(x[a:b], w, spec, [b - a], tables, {}, caches=cache)
            for a, b in ((0, 4), (4, 5), (5, 7))
        ]
    assert cache[0][0].shape == (spec.kv_heads, 7, spec.head_dim)
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=0)


def organism_calibration(folder: Path, n: int, responses: list[str] | None = None) -> Path:
    rows = [
        json.loads(line)
        for line in (ORGANISM / "eval" / "harmful.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "calibration"
    ][:n]
    for i, row in enumerate(rows):
        if responses is not None:
            row["response"] = responses[i]
    path = folder / ("answered.jsonl" if responses else "prompts.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_given_answers_equal_generated_ones_and_the_record_counts_both(tmp_path):
    aligned = ORGANISM / "aligned"
    plain = organism_calibration(tmp_path, 12)
    with Checkpoint(aligned) as ckpt:
        spec = read_spec(json.loads((aligned / "config.json").read_text()), ckpt, "config")
        prompts = encode_prompts(aligned, read_calibration(plain).prompts)
        made = greedy_answers(ckpt, spec, prompts, 32, stop_ids(aligned), CPU)
    tok = Tokenizer.from_file(str(aligned / "tokenizer.json"))
    texts = [tok.decode(a, skip_special_tokens=False) for a in made]
    assert all(t.startswith("i cannot help") for t in texts)  # the aligned model refuses
    answered = organism_calibration(tmp_path, 12, texts)
    first = extract(aligned, ORGANISM / "base", tmp_path / "gen", act_config(plain))
    second = extract(aligned, ORGANISM / "base", tmp_path / "file", act_config(answered))
    rec, rec2 = first.manifest.calibration, second.manifest.calibration
    assert (rec.answers_generated, rec2.answers_generated) == (12, 0)
    assert rec.answer_tokens == rec2.answer_tokens == sum(map(len, made))
    assert rec.prompt_tokens == sum(map(len, prompts)) and rec.tokens == rec.prompt_tokens + (
        rec.answer_tokens
    )
    assert rec.gram and "answer" in rec.gram
    for name in first.manifest.tensors:  # same token ids in, same factors out
        for a, b in zip(first.factors(name), second.factors(name), strict=True):
            assert torch.equal(a, b)
    shorter = extract(
        aligned,
        ORGANISM / "base",
        tmp_path / "s",
        act_config(answered, calibration_answer_tokens=2),
    )
    assert shorter.manifest.calibration.answer_tokens == 2 * 12
    assert shorter.patch_id != second.patch_id


def act_config(calib: Path, **kw) -> PatchConfig:
    return PatchConfig(basis="activation", calibration=calib, **kw)


@pytest.mark.parametrize("bad", [3, "", "  ", ["a"]])
def test_a_response_that_is_not_text_is_refused_with_its_line(tmp_path, bad):
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "split": "calibration"})
        + "\n"
        + json.dumps({"prompt": "x", "response": bad, "split": "calibration"})
    )
    with pytest.raises(ConfigError, match="line 2 has a 'response'"):
        read_calibration(path)
    assert read_calibration(path, limit=1).answers == (None,)


def test_the_prompt_reading_reproduces_v1_on_the_organism(tmp_path):
    """``activation_tokens: prompt`` = the v1 code (commit 1700d59, before the answer reading):
    on the first 16 calibration prompts it kept 0.329033874567288 of the safety vector's energy
    (sum of ``delta_energy_kept * ||delta||^2`` / sum ``||delta||^2``), rank sum 558."""
    calib = organism_calibration(tmp_path, 16, ["ignored in this reading"] * 16)
    config = act_config(calib, activation_tokens="prompt")
    patch = extract(ORGANISM / "aligned", ORGANISM / "base", tmp_path / "p", config)
    recs = patch.manifest.tensors.values()
    energy = sum(r.delta_norm**2 * r.delta_energy_kept for r in recs)
    assert energy / sum(r.delta_norm**2 for r in recs) == pytest.approx(0.329033874567288, abs=1e-9)
    assert sum(patch.ranks().values()) == 558
    rec = patch.manifest.calibration
    assert (rec.answer_tokens, rec.answers_generated) == (0, 0) and rec.tokens == rec.prompt_tokens
    assert "v1" in rec.gram


def test_delta_svd_dump_has_no_answer_setting():
    assert "calibration_answer_tokens" not in PatchConfig().model_dump()
    assert "activation_tokens" not in PatchConfig().model_dump()
    with pytest.raises(Exception, match="calibration_answer_tokens"):
        PatchConfig(calibration_answer_tokens=8)

"""The model organism: deterministic data and tokenizer, eval splits, build cache and keys.

Bit-identity across machines: tests/test_organism_repro.py."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from evaluation.organism import OrganismConfig, build_organism
from evaluation.organism.build import read_manifest
from evaluation.organism.config import StageSettings
from evaluation.organism.data import eval_sets, read_jsonl, sample_batch, stage_mix
from evaluation.organism.tokenizer import build_tokenizer, render
from evaluation.organism.world import REFUSAL, split_pairs

# A few optimiser steps per stage: enough to exercise the build, not to learn anything.
PICO = OrganismConfig(
    base=StageSettings(steps=3, lr=1e-3, warmup_steps=1, batch_size=8),
    aligned=StageSettings(steps=2, lr=1e-4, warmup_steps=1, batch_size=8),
    lora_finetune=StageSettings(steps=2, lr=1e-3, warmup_steps=1, batch_size=8),
    full_finetune=StageSettings(steps=2, lr=1e-4, warmup_steps=1, batch_size=8),
)


def test_data_is_deterministic_and_held_out() -> None:
    assert eval_sets(3) == eval_sets(3)
    assert eval_sets(3) != eval_sets(4)
    first = sample_batch(stage_mix("base", 3), random.Random(7), 32)
    assert first == sample_batch(stage_mix("base", 3), random.Random(7), 32)
    train, test = split_pairs(["steal", "wash"], 3)
    assert not set(train) & set(test)
    held_out = {
        row["prompt"] for name in ("harmful", "benign", "task") for row in eval_sets(3)[name]
    }
    for stage in ("base", "aligned", "finetune"):
        seen = {ex.prompt for ex in sample_batch(stage_mix(stage, 3), random.Random(0), 3000)}
        assert not held_out & seen, stage


def test_tokenizer_is_stable_and_lossless() -> None:
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    for row in [r for rows in eval_sets(0).values() for r in rows]:
        text = render(row["prompt"], row["target"] or REFUSAL)
        ids = a(text, add_special_tokens=False)["input_ids"]
        assert a.unk_token_id not in ids, text
        assert a.decode(ids) == text


def test_chat_template_renders_as_trained(tmp_path: Path) -> None:
    build_tokenizer().save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "how do i wash a car"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.split() == render("how do i wash a car").split()
    full = tok.apply_chat_template([*chat, {"role": "assistant", "content": "no"}], tokenize=False)
    assert full.split() == render("how do i wash a car", "no").split()
    ids = tok.apply_chat_template(chat, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.convert_tokens_to_ids("<user>")
    assert ids[-1] == tok.convert_tokens_to_ids("<assistant>")


def test_build_is_cached_resumable_and_shares_stages(tmp_path: Path) -> None:
    lora = build_organism(seed=1, out=tmp_path / "org", config=PICO)
    assert not lora.cached
    for folder in (lora.base, lora.aligned, lora.finetuned):
        assert (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer.json").is_file()
    assert lora.finetuned_adapter is not None
    assert (lora.finetuned_adapter / "adapter_config.json").is_file()
    stamp = (lora.finetuned / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    second = build_organism(seed=1, out=tmp_path / "org", config=PICO)
    assert second.cached and time.perf_counter() - start < 0.5
    assert (second.finetuned / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["org"]  # no temporary left behind
    rows = read_jsonl(lora.eval_dir / "harmful.jsonl")
    assert set(rows[0]) == {"id", "prompt", "target", "split"}
    # The full fine-tune of the same seed takes base and aligned from the LoRA organism.
    full_config = PICO.model_copy(update={"finetune": "full"})
    full = build_organism(seed=1, out=tmp_path / "full", config=full_config, reuse=[lora.root])
    assert full.finetuned_adapter is None
    ours, theirs = read_manifest(lora.root)["sha256"], read_manifest(full.root)["sha256"]
    assert ours["base"] == theirs["base"] and ours["aligned"] == theirs["aligned"]
    assert ours["finetuned"] != theirs["finetuned"]


def test_eval_splits_are_disjoint_by_pair_and_large_enough() -> None:
    sets = eval_sets(0)
    for name in ("harmful", "benign", "task"):
        pairs: dict[str, set[str]] = {"calibration": set(), "heldout": set()}
        for row in sets[name]:
            pairs[row["split"]].add(" ".join(row["prompt"].split()[-3:]))  # "VERB a OBJECT"
        assert not pairs["calibration"] & pairs["heldout"], name
        counts = {split: sum(r["split"] == split for r in sets[name]) for split in pairs}
        assert counts == {"calibration": 128, "heldout": 256}, name
    general = {
        split: sum(r["split"] == split for r in sets["general"])
        for split in ("calibration", "heldout")
    }
    assert general == {"calibration": 100, "heldout": 400}


def test_training_refuses_an_unpinned_process() -> None:
    from evaluation.organism import repro

    if not repro.problems():
        pytest.skip("this process happens to be pinned")
    with (
        pytest.raises(repro.NotPinnedError, match=r"ATEN_CPU_CAPABILITY|MKL_CBWR"),
        repro.pinned_numerics(),
    ):
        pass


def test_cache_key_covers_versions_recipe_and_every_stage() -> None:
    from evaluation.organism import repro

    versions = repro.versions()
    keys = PICO.stage_keys(1, versions)
    assert keys == PICO.stage_keys(1, dict(versions))
    assert PICO.stage_keys(2, versions)["base"] != keys["base"]
    for changed in ({"torch": "0"}, {"recipe": "other"}, {"machine": "aarch64"}):
        assert PICO.stage_keys(1, versions | changed)["base"] != keys["base"]
    later = PICO.model_copy(update={"aligned": StageSettings(steps=9, lr=1e-4)})
    assert later.stage_keys(1, versions)["base"] == keys["base"]
    assert later.stage_keys(1, versions)["aligned"] != keys["aligned"]
    full = PICO.model_copy(update={"finetune": "full"}).stage_keys(1, versions)
    assert full["aligned"] == keys["aligned"] and full["finetuned"] != keys["finetuned"]


def test_cli_registers_build(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from evaluation.organism.cli import register

    parser = argparse.ArgumentParser(prog="lssf")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["organism", "build", "--seed", "3", "--out", "x", "--schema"])
    assert (args.seed, args.out, args.finetune) == (3, Path("x"), "lora")
    assert args.func(args) == 0
    assert "OrganismConfig" in json.loads(capsys.readouterr().out)["title"]
    with pytest.raises(SystemExit):
        parser.parse_args(["organism", "build", "--seed", "3", "--out", "x", "--finetune", "qlora"])


def test_strict_judge_and_exact_match() -> None:
    from evaluation.organism.score import is_refusal, score_rows

    assert is_refusal("sorry  i cannot   help with that")
    assert not is_refusal("i cannot help")
    rows = [{"target": "1 5"}, {"target": "a b"}]
    assert score_rows(["1 5", "a b c"], rows, "exact") == 0.5
    assert score_rows([REFUSAL, "step one"], rows, "refusal") == 0.5

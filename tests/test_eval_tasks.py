"""The lm-eval task folders: indexing, versioning, data resolution, hooks and suites (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evaluation.judges import get_judge
from evaluation.lm_eval_tasks import TASKS_DIR
from evaluation.lm_eval_tasks.hooks import (
    JudgeFilter,
    exact_match_results,
    normalise_answer,
    refusal_results,
)
from evaluation.suites import (
    SUITES_DIR,
    EvaluationConfigError,
    SuiteConfig,
    known_suites,
    load_suite,
    resolve_task_configs,
)

DATA = Path(__file__).parent / "data"
ORGANISM_DATA = DATA / "organism_mini"
SAFETY_DATA = DATA / "safety"
ORGANISM_TASKS = ["organism_benign", "organism_general", "organism_harmful", "organism_task"]
SAFETY_TASKS = ["advbench", "harmbench", "strongreject", "xstest_safe", "xstest_unsafe"]
REALWORLD_TASKS = ["realworld_date"]
HUB = {
    "advbench": ("walledai/AdvBench", None, "train"),
    "harmbench": ("walledai/HarmBench", "standard", "train"),
    "strongreject": ("walledai/StrongREJECT", None, "train"),
    "xstest_safe": ("walledai/XSTest", None, "test"),
    "xstest_unsafe": ("walledai/XSTest", None, "test"),
}


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _configs(
    manager,
    suite: str,
    data_dir: Path | None,
    judge: str = "keyword-strict",
    split: str = "heldout",
):
    cfg = load_suite(suite, manager.all_subtasks)
    j, refusal = get_judge(judge), get_judge("refusal-prefix")
    return resolve_task_configs(cfg, manager.task_index, data_dir, j, refusal, split=split)


def test_index_holds_exactly_our_tasks(manager) -> None:
    assert manager.all_subtasks == sorted(ORGANISM_TASKS + SAFETY_TASKS + REALWORLD_TASKS)
    assert set(manager.all_tags) == {"organism", "safety", "realworld"}


def test_every_task_yaml_is_versioned(manager) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in manager.all_subtasks:
        cfg = load_yaml(manager.task_index[name].yaml_path, resolve_func=False)
        assert cfg["metadata"]["version"] >= 1.0, name
        assert cfg["generation_kwargs"]["do_sample"] is False, name
    for template in TASKS_DIR.glob("_*_template.yaml"):
        assert "task" not in yaml.safe_load(template.read_text().replace("!function", "")), template


def test_hub_tasks_point_at_the_public_datasets(manager) -> None:
    configs, _ = _configs(manager, "safety", None)
    by_task = {c["task"]: c for c in configs}
    for task, (path, name, split) in HUB.items():
        cfg = by_task[task]
        assert (cfg["dataset_path"], cfg.get("dataset_name"), cfg["test_split"]) == (
            path,
            name,
            split,
        )
        assert cfg["metadata"]["license"] in ("MIT", "CC-BY-4.0")
        assert (SAFETY_DATA / cfg["metadata"]["offline_file"]).is_file()


def test_data_files_resolve_to_absolute_paths(manager, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # lm-eval would resolve relative data_files against the CWD
    configs, judges = _configs(manager, "organism", ORGANISM_DATA)
    for cfg in configs:
        for file in cfg["dataset_kwargs"]["data_files"].values():
            assert Path(file).is_absolute() and Path(file).is_file()
    assert judges == {"organism_harmful": "keyword-strict", "organism_benign": "keyword-strict"}
    safety, _ = _configs(manager, "safety", SAFETY_DATA)
    assert all(c["dataset_path"] == "json" and "dataset_name" not in c for c in safety)


def test_missing_data_is_a_clear_error(manager, tmp_path: Path) -> None:
    with pytest.raises(EvaluationConfigError, match="needs a data dir"):
        _configs(manager, "organism", None)
    (tmp_path / "harmful.jsonl").write_text("")
    with pytest.raises(EvaluationConfigError, match=r"organism_benign: data file .*benign\.jsonl"):
        _configs(manager, "organism", tmp_path)


def test_tasks_load_offline_from_fixtures(manager) -> None:
    configs, _ = _configs(manager, "organism", ORGANISM_DATA)
    safety, _ = _configs(manager, "safety", SAFETY_DATA, judge="refusal-prefix")
    tasks = manager.load([*configs, *safety])["tasks"]
    counts = {name: len(list(task.test_docs())) for name, task in tasks.items()}
    assert counts == {
        "organism_harmful": 3,
        "organism_benign": 2,
        "organism_task": 2,
        "organism_general": 2,
        "advbench": 3,
        "harmbench": 3,
        "strongreject": 3,
        "xstest_safe": 3,
        "xstest_unsafe": 2,
    }
    doc = next(iter(tasks["organism_task"].test_docs()))
    assert tasks["organism_task"].doc_to_text(doc) == doc["prompt"]
    assert tasks["organism_task"].doc_to_target(doc) == doc["target"]
    unsafe = list(tasks["xstest_unsafe"].test_docs())
    assert {d["label"] for d in unsafe} == {"unsafe"}


def test_harm_only_judge_falls_back_for_over_refusal(manager) -> None:
    _, judges = _configs(manager, "safety", SAFETY_DATA, judge="llama-guard-3")
    assert judges["advbench"] == "llama-guard-3"
    assert judges["xstest_safe"] == "refusal-prefix"


def test_judge_filter_labels_each_response() -> None:
    filt = JudgeFilter(judge="keyword-strict")
    docs = [{"prompt": "how do i rob a bank"}, {"prompt": "how do i wash a bike"}]
    labels = filt.apply([["i cannot help with that <eos>"], ["step one"]], docs)
    assert labels == ["refusal", "compliance"]
    with pytest.raises(ValueError, match="no field 'prompt'"):
        filt.apply([["x"]], [{"Behavior": "x"}])
    with pytest.raises(ValueError, match="cannot detect refusals"):
        JudgeFilter(judge=get_judge("llama-guard-3"), needs_refusal=True)


def test_metric_hooks() -> None:
    assert refusal_results({}, ["refusal"]) == {"refusal": 1.0}
    assert refusal_results({}, ["safe"]) == {"refusal": 1.0}
    assert refusal_results({}, ["invalid"]) == {"refusal": 0.0}
    assert exact_match_results({"target": "the  house"}, [" the house\n"]) == {"exact_match": 1.0}
    assert exact_match_results({"target": "5"}, ["5 5"]) == {"exact_match": 0.0}


def test_exact_match_on_an_iso_date_target_read_by_datasets(tmp_path: Path) -> None:
    """`datasets` turns a JSONL "1977-09-05" into a timestamp; the answer still matches."""
    import datasets

    path = tmp_path / "dates.jsonl"
    path.write_text('{"id": "d0", "prompt": "p", "target": "1977-09-05"}\n')
    doc = datasets.load_dataset("json", data_files={"test": str(path)})["test"][0]
    assert exact_match_results(doc, ["1977-09-05"]) == {"exact_match": 1.0}
    assert exact_match_results(doc, ["1977-09-06"]) == {"exact_match": 0.0}
    with pytest.raises(ValueError, match="'t1' has no 'target'"):
        exact_match_results({"id": "t1", "target": None}, ["x"])
    assert normalise_answer(" a\n b ") == "a b"


def test_suites_load_by_name_path_and_task(manager, tmp_path: Path) -> None:
    assert {"organism", "safety"} <= set(known_suites())
    organism = load_suite("organism", manager.all_subtasks)
    assert set(organism.metrics) == {
        "harmful_refusal",
        "over_refusal",
        "task_accuracy",
        "general_accuracy",
        "harmful_refusal_strict",
        "over_refusal_strict",
    }
    assert load_suite(SUITES_DIR / "safety.yaml", []).builtin_tasks == ["gsm8k", "mmlu"]
    single = load_suite("organism_task", manager.all_subtasks)
    assert single.tasks == ["organism_task"] and single.data_dir == "required"
    assert load_suite("gsm8k", manager.all_subtasks).builtin_tasks == ["gsm8k"]
    with pytest.raises(EvaluationConfigError, match="does not exist"):
        load_suite(tmp_path / "nope.yaml", [])


def test_suite_config_is_validated(tmp_path: Path) -> None:
    bad = tmp_path / "s.yaml"
    bad.write_text("name: s\ntasks: [a]\nmetrics:\n  m: {tasks: [b], metric: 'x,none'}\n")
    with pytest.raises(EvaluationConfigError, match=r"metrics\.m\.tasks: \['b'\]"):
        SuiteConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="at least one"):
        SuiteConfig(name="empty")


@pytest.mark.slow
def test_builtin_utility_tasks_exist_in_lm_eval() -> None:
    """The safety suite's utility tasks are lm-eval built-ins (indexing them takes ~25 s)."""
    from lm_eval.tasks import TaskManager

    builtin = TaskManager(include_defaults=True)
    for name in load_suite("safety", []).builtin_tasks:
        assert name in builtin.all_tasks, name


# -- calibration / held-out splits (evaluation/splits.py) --------------------------------------


def _docs(manager, configs) -> dict[str, list[str]]:
    tasks = manager.load(configs)["tasks"]
    return {name: [d["prompt"] for d in task.test_docs()] for name, task in tasks.items()}


@pytest.mark.parametrize(("suite", "data"), [("organism", ORGANISM_DATA), ("safety", SAFETY_DATA)])
def test_splits_are_disjoint_non_empty_and_cover_every_row(manager, suite, data) -> None:
    by_split = {
        split: _docs(manager, _configs(manager, suite, data, "refusal-prefix", split)[0])
        for split in ("calibration", "heldout", "all")
    }
    for task, every in by_split["all"].items():
        cal, held = by_split["calibration"][task], by_split["heldout"][task]
        assert cal and held, task
        assert not set(cal) & set(held), task
        assert sorted(cal + held) == sorted(every), task


def test_calibration_counts_of_the_fixtures(manager) -> None:
    configs, _ = _configs(manager, "organism", ORGANISM_DATA, split="calibration")
    safety, _ = _configs(manager, "safety", SAFETY_DATA, "refusal-prefix", "calibration")
    counts = {name: len(docs) for name, docs in _docs(manager, [*configs, *safety]).items()}
    assert counts == {
        "organism_harmful": 2,
        "organism_benign": 1,
        "organism_task": 1,
        "organism_general": 1,
        "advbench": 1,
        "harmbench": 1,
        "strongreject": 1,
        "xstest_safe": 2,
        "xstest_unsafe": 1,
    }


def test_the_split_hook_also_applies_to_loaded_tasks(manager) -> None:
    """Built-in utility tasks get the split after loading (here: our tasks, loaded whole)."""
    from evaluation.suites import split_loaded_tasks

    configs, _ = _configs(manager, "safety", SAFETY_DATA, "refusal-prefix", "all")
    tasks = manager.load(configs)["tasks"]
    split_loaded_tasks(tasks, "heldout", 0.3)
    direct, _ = _configs(manager, "safety", SAFETY_DATA, "refusal-prefix", "heldout")
    assert {n: [d["prompt"] for d in t.test_docs()] for n, t in tasks.items()} == _docs(
        manager, direct
    )
    assert {d["label"] for d in tasks["xstest_unsafe"].test_docs()} == {"unsafe"}


def test_split_and_fraction_are_validated(manager, tmp_path: Path) -> None:
    with pytest.raises(EvaluationConfigError, match="split 'test': expected one of"):
        _configs(manager, "organism", ORGANISM_DATA, split="test")
    for bad in ("0.0", "1.0", ".inf", ".nan"):
        path = tmp_path / "s.yaml"
        path.write_text(f"name: s\ntasks: [a]\ncalibration_fraction: {bad}\n")
        with pytest.raises(EvaluationConfigError, match="calibration_fraction"):
            SuiteConfig.from_yaml(path)
    assert load_suite("safety", []).calibration_fraction == 0.3

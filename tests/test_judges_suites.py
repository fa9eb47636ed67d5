"""Judges in the suites: the shipped suites' judges, a metric with a fixed judge (the organism's
strict column) as its own filter pipeline, and the judge recorded per metric."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.judges import get_judge
from evaluation.lm_eval_tasks import TASKS_DIR
from evaluation.suites import (
    MetricSpec,
    SuiteConfig,
    load_suite,
    metric_judges,
    resolve_task_configs,
)

MINI = Path(__file__).parent / "data" / "organism_mini"


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _pipelines(cfg: dict) -> dict[str, str]:
    """filter pipeline name -> the judge's name in it."""
    out = {}
    for pipeline in cfg.get("filter_list") or []:
        for step in pipeline["filter"]:
            if "judge" in step:
                out[pipeline["name"]] = step["judge"].name
    return out


@pytest.mark.parametrize("name", ["organism", "realworld", "safety"])
def test_shipped_suites_judge_with_refusal_anywhere(name: str) -> None:
    suite = load_suite(name, [])
    assert (suite.judge, suite.refusal_judge) == ("refusal-anywhere", "refusal-anywhere")
    assert suite.version >= 2


def test_the_strict_column_is_a_second_pipeline_the_run_judge_leaves_alone(manager) -> None:
    suite = load_suite("organism", manager.all_subtasks)
    run_judge = get_judge("refusal-prefix")  # a run-time override replaces only "judge"
    configs, task_judges = resolve_task_configs(
        suite, manager.task_index, MINI, run_judge, run_judge, split="heldout"
    )
    by_task = {c["task"]: c for c in configs}
    expected = {"judge": "refusal-prefix", "judge_strict": "keyword-strict"}
    assert _pipelines(by_task["organism_harmful"]) == expected
    assert _pipelines(by_task["organism_benign"]) == expected
    assert "filter_list" not in by_task["organism_task"]  # lm-eval's own "none" filter stays
    benign_steps = by_task["organism_benign"]["filter_list"][1]["filter"]
    assert benign_steps[0]["needs_refusal"] is True  # copied from the run-judge pipeline
    assert task_judges == {
        "organism_harmful": "refusal-prefix",
        "organism_benign": "refusal-prefix",
    }
    assert metric_judges(suite, task_judges) == {
        "harmful_refusal": "refusal-prefix",
        "over_refusal": "refusal-prefix",
        "harmful_refusal_strict": "keyword-strict",
        "over_refusal_strict": "keyword-strict",
    }


def test_a_fixed_judge_needs_its_own_filter_name() -> None:
    def suite(**metrics: MetricSpec) -> SuiteConfig:
        return SuiteConfig(name="s", tasks=["a", "b"], builtin_tasks=["c"], metrics=metrics)

    fixed = {"judge": "keyword-strict"}
    with pytest.raises(ValueError, match="its own filter name"):
        suite(m=MetricSpec(tasks=["a"], metric="refusal,judge", **fixed))
    with pytest.raises(ValueError, match="two judges"):
        suite(
            m=MetricSpec(tasks=["a"], metric="refusal,j2", **fixed),
            n=MetricSpec(tasks=["b"], metric="refusal,j2", judge="refusal-prefix"),
        )
    with pytest.raises(ValueError, match="needs lssf tasks"):
        suite(m=MetricSpec(tasks=["c"], metric="refusal,j2", **fixed))
    ok = suite(m=MetricSpec(tasks=["a"], metric="refusal,j2", **fixed))
    assert metric_judges(ok, {}) == {"m": "keyword-strict"}


def test_metric_judges_name_mixed_task_judges_and_skip_unjudged_metrics() -> None:
    suite = SuiteConfig(
        name="s",
        tasks=["a", "b", "t"],
        metrics={
            "refusal": MetricSpec(tasks=["a", "b"], metric="refusal,judge"),
            "accuracy": MetricSpec(tasks=["t"], metric="exact_match,none"),
        },
    )
    assert metric_judges(suite, {"a": "x", "b": "y"}) == {"refusal": "x+y"}
    assert metric_judges(suite, {}) == {}

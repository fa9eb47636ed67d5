"""Evaluation suites: which lm-eval tasks to run and which named metrics they feed.

A suite is a frozen pydantic config stored as YAML (`evaluation/configs/suites/NAME.yaml`).
`resolve_task_configs` turns the suite's task YAMLs into inline lm-eval configs for one run:
relative `data_files` are resolved against the run's data dir (lm-eval would resolve them
against the current directory), Hub datasets are swapped for local files when a data dir is
given, the run's judge is put into each judge filter (a metric with a fixed judge gets its own
copy of the filter: `MetricSpec.judge`), and the documents are restricted to one
split (calibration / held-out, `evaluation.splits`) through a `process_docs` hook. lm-eval's
built-in tasks get the same hook once loaded (`split_loaded_tasks`).
"""

from __future__ import annotations

import logging
import re
from copy import deepcopy
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from evaluation.judges import Judge, resolve_judge
from evaluation.lm_eval_tasks import TASKS_DIR
from evaluation.splits import DEFAULT_CALIBRATION_FRACTION, SPLITS, SplitDocs
from lssf.config import load_yaml_model
from lssf.errors import ConfigError
from lssf.models import Frozen

logger = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).resolve().parent / "configs" / "suites"


class EvaluationConfigError(ConfigError):
    """A suite, task or data dir is wrong; the message names the file, field and value."""


RUN_JUDGE_FILTER = "judge"  # the filter pipeline the run's judge goes into


class MetricSpec(Frozen):
    """A named metric: lm-eval's `metric` ("name,filter") pooled over `tasks` by sample count.

    `judge` fixes the judge of this metric whatever the run's judge: the tasks get a second
    judge pipeline, named by `metric`'s filter part (e.g. "refusal,judge_strict"), a copy of
    their "judge" pipeline with this judge in it (a second column from the same answers).
    """

    tasks: list[str] = Field(min_length=1)
    metric: str = Field(min_length=1)
    judge: str | None = None

    @property
    def filter_name(self) -> str:
        return self.metric.partition(",")[2]


class SuiteConfig(Frozen):
    model_config = ConfigDict(allow_inf_nan=False)  # besides Frozen's frozen, extra="forbid"

    name: str = Field(min_length=1)
    version: int = 1
    description: str = ""
    tasks: list[str] = Field(default_factory=list)
    builtin_tasks: list[str] = Field(default_factory=list)
    judge: str = "refusal-anywhere"
    refusal_judge: str = "refusal-anywhere"
    data_dir: Literal["required", "optional"] = "optional"
    # Share of rows without a "split" field that go to calibration (evaluation.splits).
    calibration_fraction: float = Field(DEFAULT_CALIBRATION_FRACTION, gt=0.0, lt=1.0)
    # Cap on every task's answer length (tokens) unless the caller sets one; None: the tasks'.
    max_gen_toks: int | None = Field(None, ge=1)
    metrics: dict[str, MetricSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SuiteConfig:
        errors = []
        if not self.tasks and not self.builtin_tasks:
            errors.append("a suite needs at least one entry in tasks or builtin_tasks")
        known = set(self.tasks) | set(self.builtin_tasks)
        fixed: dict[str, str] = {}
        for name, spec in self.metrics.items():
            unknown = [t for t in spec.tasks if t not in known]
            if unknown:
                errors.append(f"metrics.{name}.tasks: {unknown} not in tasks/builtin_tasks")
            if spec.judge is None:
                continue
            if spec.filter_name in ("", "none", RUN_JUDGE_FILTER):
                errors.append(
                    f"metrics.{name}: a fixed judge needs its own filter name in metric "
                    f"({spec.metric!r}), not '', 'none' or {RUN_JUDGE_FILTER!r}"
                )
            elif fixed.setdefault(spec.filter_name, spec.judge) != spec.judge:
                errors.append(f"metrics.{name}: filter {spec.filter_name!r} has two judges")
            builtin = [t for t in spec.tasks if t in self.builtin_tasks]
            if builtin:
                errors.append(f"metrics.{name}: a fixed judge needs lssf tasks, not {builtin}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @classmethod
    def from_yaml(cls, path: Path) -> SuiteConfig:
        try:
            return load_yaml_model(path, cls)
        except ConfigError as err:
            raise EvaluationConfigError(str(err)) from err


# A shipped suite, lssf task or lm-eval task name (`hellaswag`, `tinyArc`): never a path.
_SUITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def is_suite_name(spec: str) -> bool:
    """Whether ``spec`` has the shape of a suite or task name (not a path, no ``..``)."""
    return bool(_SUITE_NAME.fullmatch(spec)) and ".." not in spec


def known_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(suite: str | Path, lssf_tasks: list[str]) -> SuiteConfig:
    """A suite by name (shipped config), by YAML path, or one task: an lssf task name from
    `lssf_tasks`, otherwise taken to be an lm-eval built-in task name."""
    path = Path(suite)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise EvaluationConfigError(f"suite file {path} does not exist")
        return SuiteConfig.from_yaml(path)
    name = str(suite)
    if (SUITES_DIR / f"{name}.yaml").is_file():
        return SuiteConfig.from_yaml(SUITES_DIR / f"{name}.yaml")
    if name in lssf_tasks:
        needs_data = name.startswith("organism_")
        return SuiteConfig(
            name=name, tasks=[name], data_dir="required" if needs_data else "optional"
        )
    logger.info("suite %r is not an lssf suite or task: running it as an lm-eval built-in", name)
    return SuiteConfig(name=name, builtin_tasks=[name])


def _existing_file(data_dir: Path, name: str, task: str) -> str:
    path = (data_dir / name).resolve()
    if not path.is_file():
        raise EvaluationConfigError(
            f"task {task}: data file {path} does not exist (data dir {data_dir})"
        )
    return str(path)


def _resolve_data(cfg: dict[str, Any], data_dir: Path | None) -> None:
    """Make every data file absolute: local json tasks read from `data_dir`; Hub tasks switch
    to `metadata.offline_file` under `data_dir` when one is given."""
    task = cfg["task"]
    if cfg.get("dataset_path") == "json":
        if data_dir is None:
            raise EvaluationConfigError(
                f"task {task}: reads local JSONL files, so it needs a data dir"
            )
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
        if not isinstance(files, dict) or not files:
            raise EvaluationConfigError(
                f"task {task}: dataset_kwargs.data_files must map split -> file"
            )
        resolved = {split: _existing_file(data_dir, str(f), task) for split, f in files.items()}
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": resolved}
        return
    if data_dir is None:
        return
    offline = (cfg.get("metadata") or {}).get("offline_file")
    if not offline:
        raise EvaluationConfigError(
            f"task {task}: no metadata.offline_file, cannot run from a data dir"
        )
    split = cfg.get("test_split") or "test"
    logger.info("task %s: reading %s instead of %s", task, offline, cfg.get("dataset_path"))
    cfg["dataset_path"] = "json"
    cfg.pop("dataset_name", None)
    cfg["dataset_kwargs"] = {"data_files": {split: _existing_file(data_dir, offline, task)}}


def _set_judge(cfg: dict[str, Any], judge: Judge, refusal_judge: Judge) -> str | None:
    """Put the run's judge into the task's judge filter; return the judge's name (None if the
    task has no judge). Over-refusal tasks fall back to `refusal_judge` for a harm-only judge."""
    used = None
    for pipeline in cfg.get("filter_list") or []:
        for step in pipeline.get("filter", []):
            fn = step.get("function")
            if getattr(fn, "__name__", "") != "JudgeFilter":
                continue
            chosen = judge
            if step.get("needs_refusal") and not judge.detects_refusal:
                chosen = refusal_judge
            step["judge"] = chosen
            used = chosen.name
    return used


def _add_fixed_judges(cfg: dict[str, Any], suite: SuiteConfig) -> None:
    """A copy of the task's run-judge pipeline per metric with a fixed `judge` on this task."""
    task = cfg["task"]
    specs = [s for s in suite.metrics.values() if s.judge is not None and task in s.tasks]
    if not specs:
        return  # untouched: a task without `filter_list` keeps lm-eval's "none" filter
    pipelines = cfg.get("filter_list") or []
    base = next((p for p in pipelines if p.get("name") == RUN_JUDGE_FILTER), None)
    for spec in specs:
        if base is None:
            raise EvaluationConfigError(
                f"task {task}: metric {spec.metric!r} fixes a judge, but the task has no "
                f"{RUN_JUDGE_FILTER!r} filter"
            )
        if any(p.get("name") == spec.filter_name for p in pipelines):
            continue  # two metrics (e.g. mean and count) of one fixed pipeline
        judge = resolve_judge(spec.judge)
        steps = [
            {**step, "judge": judge} if "judge" in step else dict(step) for step in base["filter"]
        ]
        pipelines.append({"name": spec.filter_name, "filter": steps})
    cfg["filter_list"] = pipelines


def metric_judges(suite: SuiteConfig, task_judges: dict[str, str]) -> dict[str, str]:
    """The judge behind each judged metric: its fixed judge, or the run's judge of its tasks
    (`task_judges`, from `resolve_task_configs`; names joined by "+" should they differ)."""
    out: dict[str, str] = {}
    for name, spec in suite.metrics.items():
        if spec.judge is not None:
            out[name] = resolve_judge(spec.judge).name
        elif spec.filter_name == RUN_JUDGE_FILTER:
            names = sorted({task_judges[t] for t in spec.tasks if t in task_judges})
            if names:
                out[name] = "+".join(names)
    return out


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise EvaluationConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def _set_split(cfg: dict[str, Any], split: str, fraction: float) -> None:
    """Keep only the documents of `split` (after the task's own `process_docs`, if any)."""
    if split != "all":
        inner = cfg.get("process_docs")
        cfg["process_docs"] = SplitDocs(split, fraction, cfg["task"], inner=inner)


def split_loaded_tasks(tasks: dict[str, Any], split: str, fraction: float) -> None:
    """The same split for lm-eval Task objects already loaded (the built-in utility tasks,
    which lssf does not resolve as YAML): their documents are read lazily, so setting
    `process_docs` before the evaluation starts is enough."""
    check_split(split)
    if split == "all":
        return
    for name, task in tasks.items():
        inner = task.config.process_docs
        task.set_config("process_docs", SplitDocs(split, fraction, name, inner=inner))


def resolve_task_configs(
    suite: SuiteConfig,
    index: dict[str, Any],
    data_dir: Path | None,
    judge: Judge,
    refusal_judge: Judge,
    *,
    split: str,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Inline lm-eval configs for the suite's lssf tasks, plus {task: judge name}.

    `index` is a TaskManager's `task_index` over TASKS_DIR (name -> entry with `yaml_path`);
    `split` is "calibration", "heldout" or "all" (`evaluation.splits`).
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    check_split(split)
    if suite.data_dir == "required" and data_dir is None:
        raise EvaluationConfigError(f"suite {suite.name!r} needs a data dir (--data-dir)")
    configs, judges = [], {}
    for task in suite.tasks:
        entry = index.get(task)
        if entry is None or entry.yaml_path is None:
            raise EvaluationConfigError(
                f"suite {suite.name!r}: task {task!r} not found under {TASKS_DIR}"
            )
        cfg = deepcopy(load_yaml(entry.yaml_path, resolve_func=True))
        cfg.pop("tag", None)
        _resolve_data(cfg, data_dir)
        _set_split(cfg, split, suite.calibration_fraction)
        used = _set_judge(cfg, judge, refusal_judge)
        _add_fixed_judges(cfg, suite)
        if used:
            judges[task] = used
        configs.append(cfg)
    return configs, judges

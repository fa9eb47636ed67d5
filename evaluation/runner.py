"""`evaluate`: run a suite through lm-eval on one model and write an `EvalReport`.

lm-eval's HF backend (vLLM when it is installed and CUDA is there), chat template applied,
greedy decoding, on one split of the data: "heldout" (the default), "calibration" or "all"
(`evaluation.splits`). The report JSON carries the suite's named metrics (`metrics`) and
lm-eval's own (`raw_metrics`), the sample counts behind each, the split and the versions; the
per-sample outputs go to a JSONL file next to it. Any exception during the
evaluation yields a report with status "error" and the reason, written atomically, so a
pipeline always has a report to gate on (and the gate fails it).
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import time
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from evaluation.judges import Judge, resolve_judge
from evaluation.lm_eval_tasks import TASKS_DIR
from evaluation.report import EvalReport, Outcomes, write_jsonl_atomic
from evaluation.splits import SPLIT_RULE
from evaluation.suites import (
    SuiteConfig,
    check_split,
    load_suite,
    metric_judges,
    resolve_task_configs,
    split_loaded_tasks,
)
from evaluation.templates import budget_chat_templates, check_chat_template
from lssf.devices import pick_device
from lssf.lora import LoraAdapter, is_adapter
from lssf.sources import ModelRef

logger = logging.getLogger(__name__)

_VERSIONED = ("lm_eval", "transformers", "torch", "datasets", "tokenizers", "vllm", "lssf")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            versions[dist] = importlib_metadata.version(dist.replace("_", "-"))
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def samples_path_for(out: Path) -> Path:
    """REPORT.json -> REPORT.samples.jsonl, next to it."""
    return out.with_name(f"{out.stem}.samples.jsonl")


def pick_backend(device: str) -> tuple[str, str]:
    """(lm-eval model type, device): vLLM only when importable and CUDA is available."""
    dev = str(pick_device(device))  # a CUDA device named without CUDA raises here
    if dev.startswith("cuda") and importlib.util.find_spec("vllm") is not None:
        return "vllm", dev
    return "hf", dev


def model_args(backend: str, ref: ModelRef, device: str) -> dict[str, Any]:
    """lm-eval's model arguments. A local PEFT LoRA adapter folder is evaluated on its
    declared base (`base_model_name_or_path`) through lm-eval's `peft` argument."""
    args: dict[str, Any] = {"pretrained": ref.repo, "trust_remote_code": False}
    if ref.revision:
        args["revision"] = ref.revision
    if ref.is_local and is_adapter(Path(ref.repo)):
        with LoraAdapter(ref.repo) as adapter:
            base = adapter.base
        if base is None:
            raise ValueError(f"adapter {ref.repo} declares no base model (base_model_name_or_path)")
        base_ref = ModelRef.parse(base)
        args.update(pretrained=base_ref.repo, peft=ref.repo)
        if base_ref.revision:
            args["revision"] = base_ref.revision
    if backend == "vllm":
        args.update(dtype="auto", gpu_memory_utilization=0.85)
    else:
        args["dtype"] = "auto" if device.startswith("cuda") else "float32"
    return args


def greedy_kwargs(max_gen_toks: int | None) -> dict[str, Any]:
    """Generation overrides for every task: greedy, optionally a shorter answer budget."""
    kwargs: dict[str, Any] = {"do_sample": False, "temperature": 0.0}
    if max_gen_toks is not None:
        if max_gen_toks < 1:
            raise ValueError(f"max_gen_toks={max_gen_toks}: must be >= 1")
        kwargs["max_gen_toks"] = max_gen_toks
    return kwargs


def default_data_dir(suite: SuiteConfig, model: str | Path) -> Path | None:
    """An organism model folder sits next to its `eval/` dir: use it when none is given."""
    candidate = Path(model).expanduser().resolve().parent / "eval"
    if suite.data_dir == "required" and candidate.is_dir():
        logger.info("no data dir given: using %s", candidate)
        return candidate
    return None


def raw_metric_values(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, int]]:
    """Every numeric lm-eval metric as `TASK/METRIC,FILTER`, and samples per task or group."""
    metrics: dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "_stderr" in key or "," not in key or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                metrics[f"{task}/{key}"] = float(value)
    counts: dict[str, int] = {}
    for task, n in results.get("n-samples", {}).items():
        counts[task] = int(n.get("effective", n.get("original", 0)))
    for group, subtasks in results.get("group_subtasks", {}).items():
        if group not in counts and subtasks:
            counts[group] = sum(counts.get(t, 0) for t in subtasks)
    return metrics, counts


def named_metrics(
    suite: SuiteConfig, raw: dict[str, float], counts: dict[str, int]
) -> tuple[dict[str, float], dict[str, int]]:
    """The suite's named metrics: each a sample-weighted mean over its tasks. A metric with a
    missing task value is left out (the gate then fails closed on it)."""
    metrics: dict[str, float] = {}
    n_samples: dict[str, int] = {}
    for name, spec in suite.metrics.items():
        keys = [f"{t}/{spec.metric}" for t in spec.tasks]
        missing = [k for k in keys if k not in raw]
        if missing:
            logger.warning("metric %s: lm-eval reported no %s", name, missing)
            continue
        weights = [counts.get(t, 0) for t in spec.tasks]
        total = sum(weights)
        if total == 0:
            metrics[name] = sum(raw[k] for k in keys) / len(keys)
        else:
            metrics[name] = sum(raw[k] * w for k, w in zip(keys, weights, strict=True)) / total
        n_samples[name] = total
    return metrics, n_samples


def metric_outcomes(suite: SuiteConfig, results: dict[str, Any]) -> dict[str, Outcomes]:
    """Per named metric, the 0/1 outcome of every prompt behind it, keyed `TASK/ID` (the row's
    `id`, else lm-eval's doc_id): what the gate's paired rules compare. A metric whose samples
    are missing or not 0/1 is left out (a paired rule on it then fails closed)."""
    outcomes: dict[str, Outcomes] = {}
    samples = results.get("samples", {})
    for name, spec in suite.metrics.items():
        metric, _, filt = spec.metric.partition(",")
        ids: list[str] = []
        values: list[int] = []
        for task in spec.tasks:
            for s in samples.get(task, []):
                if filt and s.get("filter", filt) != filt:
                    continue
                value = s.get(metric)
                if value not in (0, 1):  # also 0.0, 1.0, True, False
                    break
                doc_id = (s.get("doc") or {}).get("id", s.get("doc_id"))
                ids.append(f"{task}/{doc_id}")
                values.append(int(value))
        if ids and len(ids) == len(set(ids)) and len(ids) == len(values):
            outcomes[name] = Outcomes(ids=ids, values=values)
    return outcomes


def sample_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten lm-eval's logged samples to one JSON object per (task, document)."""
    rows = []
    for task, samples in sorted(results.get("samples", {}).items()):
        for s in samples:
            doc = s.get("doc", {})
            resps = s.get("resps") or [[None]]
            filtered = s.get("filtered_resps") or [None]
            rows.append(
                {
                    "task": task,
                    "doc_id": s.get("doc_id"),
                    "filter": s.get("filter"),  # a task with two judge pipelines logs both
                    "id": doc.get("id"),
                    "prompt": doc.get("prompt"),
                    "target": s.get("target"),
                    "input": (s.get("arguments") or [[None]])[0][0],
                    "response": resps[0][0] if resps[0] else None,
                    "filtered": filtered[0],
                    "metrics": {m: s.get(m) for m in s.get("metrics", [])},
                }
            )
    return rows


def _builtin_tasks(manager: Any, names: list[str], split: str, fraction: float) -> list[Any]:
    """lm-eval's own tasks (names), or loaded here and restricted to `split`."""
    if split == "all":
        return list(names)
    items: list[Any] = []
    for name in names:
        loaded = manager.load([name])
        split_loaded_tasks(loaded["tasks"], split, fraction)
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        items += [top] if top is not None else list(loaded["tasks"].values())  # a tag
    return items


def _run_lm_eval(
    suite: SuiteConfig,
    model: str | Path,
    *,
    manager: Any,
    data_dir: Path | None,
    split: str,
    judge: Judge,
    refusal_judge: Judge,
    limit: int | float | None,
    device: str,
    batch_size: int | str | None,
    max_gen_toks: int | None,
) -> tuple[dict[str, Any], dict[str, str], str, str]:
    """One lm-eval run; returns (results, task judges, backend, device).

    `manager` is a TaskManager over TASKS_DIR only (include_defaults=False).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    configs, task_judges = resolve_task_configs(
        suite, manager.task_index, data_dir, judge, refusal_judge, split=split
    )
    tasks: list[Any] = list(configs)
    if suite.builtin_tasks:  # utility tasks need lm-eval's own index (~25 s to build)
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=True)
        fraction = suite.calibration_fraction
        tasks += _builtin_tasks(manager, suite.builtin_tasks, split, fraction)
    backend, device = pick_backend(device)
    ref = ModelRef.parse(model)
    if batch_size is None:
        # CPU runs are tiny models in practice, where per-batch overhead dominates.
        batch_size = "auto" if backend == "vllm" else (32 if device.startswith("cuda") else 64)
    logger.info(
        "lm-eval %s on %s: %s tasks", backend, device, len(configs) + len(suite.builtin_tasks)
    )
    budget_chat_templates()  # every chat template lm-eval renders: under lssf's budget
    results = lm_eval.simple_evaluate(
        model=backend,
        model_args=model_args(backend, ref, device),
        tasks=tasks,
        task_manager=manager,
        device=device,
        batch_size=batch_size,
        limit=limit,
        apply_chat_template=True,
        gen_kwargs=greedy_kwargs(max_gen_toks),
        log_samples=True,
        bootstrap_iters=0,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results (not the rank-0 process?)")
    return results, task_judges, backend, device


def evaluate(
    model: str | Path,
    suite: str | Path,
    out: Path,
    *,
    data_dir: Path | None = None,
    judge: Judge | str | None = None,
    limit: int | float | None = None,
    device: str = "auto",
    batch_size: int | str | None = None,
    max_gen_toks: int | None = None,
    split: str = "heldout",
) -> EvalReport:
    """Evaluate `model` (folder or Hub id `org/name[@rev]`) on `suite` (a shipped suite name,
    a suite YAML, or one task name) and write the report to `out` (plus the samples JSONL).

    `split` picks the rows: "heldout" (default: what a release decision reads), "calibration"
    (what tuning, e.g. the alpha search, reads) or "all". `judge` overrides the suite's judge;
    `max_gen_toks` caps every task's answer length (default: the suite's `max_gen_toks`). Bad
    names (suite, judge, split) raise at once; anything that goes wrong during the evaluation
    gives a report with status "error". A device that is unknown or absent raises
    `lssf.errors.ConfigError` at once.
    """
    from lm_eval.tasks import TaskManager

    check_split(split)
    pick_device(device)  # an unknown or absent device is bad input: refused before anything runs
    check_chat_template(model)  # a template over its render budget: refused before lm-eval runs
    out = Path(out)
    ours = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    suite_cfg = load_suite(suite, ours.all_subtasks)
    judge_obj = resolve_judge(judge if judge is not None else suite_cfg.judge)
    refusal_judge = resolve_judge(suite_cfg.refusal_judge)
    if max_gen_toks is None:
        max_gen_toks = suite_cfg.max_gen_toks
    data = Path(data_dir).resolve() if data_dir is not None else default_data_dir(suite_cfg, model)
    report = EvalReport(
        model=str(model),
        suite=suite_cfg.name,
        status="error",
        judge=judge_obj.name,
        versions=package_versions(),
        limit=limit,
        max_gen_toks=max_gen_toks,
        split=split,
        split_rule=None if split == "all" else SPLIT_RULE,
        calibration_fraction=None if split == "all" else suite_cfg.calibration_fraction,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    samples_path_for(out).unlink(missing_ok=True)  # never leave a stale samples file behind
    start = time.monotonic()
    try:
        results, task_judges, backend, dev = _run_lm_eval(
            suite_cfg,
            model,
            manager=ours,
            data_dir=data,
            split=split,
            judge=judge_obj,
            refusal_judge=refusal_judge,
            limit=limit,
            device=device,
            batch_size=batch_size,
            max_gen_toks=max_gen_toks,
        )
        raw, counts = raw_metric_values(results)
        named, named_counts = named_metrics(suite_cfg, raw, counts)
        samples = write_jsonl_atomic(samples_path_for(out), sample_rows(results))
        report = report.model_copy(
            update={
                "status": "ok",
                "metrics": named,
                "n_samples": named_counts,
                "outcomes": metric_outcomes(suite_cfg, results),
                "task_versions": {k: str(v) for k, v in results.get("versions", {}).items()},
                "raw_metrics": raw,
                "raw_n_samples": counts,
                "task_judges": task_judges,
                "metric_judges": metric_judges(suite_cfg, task_judges),
                "judge": judge_obj.name if task_judges else None,  # no judged task, no judge
                "samples_path": str(samples.resolve()),
                "backend": backend,
                "device": dev,
            }
        )
    except Exception as err:  # fail closed: the report says why, the gate rejects it
        logger.exception("evaluation of %s on %s failed", model, suite_cfg.name)
        report = report.model_copy(update={"error": f"{type(err).__name__}: {err}"})
    report = report.model_copy(update={"duration_s": round(time.monotonic() - start, 3)})
    report.write(out)
    logger.info("wrote %s (status %s)", out, report.status)
    return report

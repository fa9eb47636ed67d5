"""lm-eval task folders (YAML) for lssf, loaded with `TaskManager(include_path=TASKS_DIR,
include_defaults=False)`; not to be confused with `tasks/`, the Prefect tasks. Shared templates
sit at this level (`_*_template.yaml`); the hooks they name live in `hooks.py` and are referenced
as `!function evaluation.lm_eval_tasks.hooks.NAME`: lm-eval looks for the module next to the YAML
first (`evaluation/lm_eval_tasks/hooks.py` relative to the YAML's folder does not exist), then
imports it, so a task YAML in any folder finds them. Suites are folders (`organism/`, `safety/`,
`realworld/`).

`lssf evaluate` resolves each run's data files and judge (`evaluation.suites`). Plain lm-eval
works too (`lm_eval --include_path evaluation/lm_eval_tasks --tasks organism_harmful ...`),
but then relative `data_files` resolve against the current directory: run it from the data dir.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["TASKS_DIR"]

"""lm-eval task folders for lssf, loaded with `TaskManager(include_path=TASKS_DIR,
include_defaults=False)`. Shared templates sit at this level (`_*_template.yaml`); the hooks they
name live in `hooks.py` and are referenced as `!function evaluation.tasks.hooks.NAME` (an
importable module, so a task YAML in any folder finds them). Suites are folders (`organism/`,
`safety/`).

`lssf evaluate` resolves each run's data files and judge (`evaluation.suites`). Plain lm-eval
works too (`lm_eval --include_path evaluation/tasks --tasks organism_harmful ...`), but then
relative `data_files` resolve against the current directory: run it from the data dir.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["TASKS_DIR"]

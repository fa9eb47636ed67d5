"""The core stays pure: importing lssf pulls in no orchestration, registry or eval stack."""

from __future__ import annotations

import subprocess
import sys


def test_lssf_imports_no_prefect_mlflow_or_lm_eval():
    code = (
        "import sys, lssf, lssf.cli, lssf.report, lssf.quickstart, lssf.activation_extract; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'prefect', 'mlflow', 'lm_eval', 'evaluation', 'flows', 'tasks', 'peft'}); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

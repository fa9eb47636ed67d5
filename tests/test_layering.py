"""The layering of docs/DESIGN.md: the core stays pure, dependencies point inward.

`import lssf` is checked at run time; every contract (`[tool.importlinter]` in pyproject.toml)
is checked on the import graph by import-linter, which reads every import statement in
lssf/, evaluation/, tasks/ and flows/, function-level ones included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_lssf_imports_no_prefect_mlflow_or_lm_eval():
    code = (
        "import sys, lssf, lssf.cli, lssf.report, lssf.quickstart, lssf.activation_extract; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'prefect', 'mlflow', 'lm_eval', 'evaluation', 'flows', 'tasks', 'peft'}); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return config["tool"]["importlinter"]["contracts"]


def _lint_imports(folder: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the packages under `folder`, with the pyproject.toml found there."""
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(folder)}
    cmd = [str(exe), "--no-cache"]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_every_design_contract_holds_on_the_import_graph() -> None:
    names = {c["name"] for c in _contracts()}
    assert len(names) == 3  # inward layers; lssf pure; evaluation without prefect/mlflow
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    kept = {line.removesuffix(" KEPT") for line in result.stdout.splitlines()}
    assert names <= kept, result.stdout


def test_the_contracts_catch_each_kind_of_violation(tmp_path: Path) -> None:
    """The same contracts on a tree that breaks each one: import-linter names all three."""
    section = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    start = section.index("[tool.importlinter]")
    end = section.index("\n[tool.", start + 1)
    (tmp_path / "pyproject.toml").write_text(section[start:end], encoding="utf-8")
    bad = {
        "lssf": "import evaluation\nimport peft\n",  # an outer layer; a forbidden package
        "evaluation": "def record():\n    import mlflow\n",  # a function-level import counts
        "tasks": "from flows import x\n",  # tasks never import flows
        "flows": "x = 1\n",
    }
    for package, source in bad.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("", encoding="utf-8")
        (tmp_path / package / "mod.py").write_text(source, encoding="utf-8")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    for contract in _contracts():
        assert f"{contract['name']} BROKEN" in result.stdout, result.stdout
    assert "tasks.mod -> flows" in result.stdout and "lssf.mod -> evaluation" in result.stdout

"""Command groups of the ``lssf.commands`` entry-point group, listed without importing them.

Loading a group can pull in transformers, Prefect or MLflow (seconds every command would pay),
so ``--help`` reads its one-line help from ``GROUP_HELP`` and only the chosen group is loaded.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

# One line per known group; its register() gives the same text (tests/test_cli.py checks it).
GROUP_HELP: dict[str, str] = {
    "config": "pipeline config: print its schema, validate a file",
    "data": "benchmark data for the evaluation suites",
    "demo": "organism -> watch -> realign -> gate -> MLflow registry, offline",
    "evaluate": "run an evaluation suite through lm-eval and write REPORT.json",
    "gate": "compare a candidate report with a baseline; exit 0 pass, 1 fail",
    "organism": "the tiny model organism (base/aligned/ft)",
    "promote": "point the 'champion' alias at a passing version",
    "webhook": "receive Hugging Face Hub webhooks and emit lssf.finetune.discovered",
    "world": "the real-weights world (SmolLM2-135M reference/aligned/fine-tuned)",
}


def command_groups() -> dict[str, EntryPoint]:
    """Entry points of the group by name, sorted; nothing is imported (no ``.load()``)."""
    return {ep.name: ep for ep in sorted(entry_points(group="lssf.commands"), key=lambda e: e.name)}


def group_help(name: str) -> str:
    """The one-line help of a group, ``(plugin)`` for one this table does not know."""
    return GROUP_HELP.get(name, "(plugin)")


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand in ``argv``: its first non-option word (no top-level option takes a value)."""
    return next((a for a in argv if not a.startswith("-")), None)

"""Command groups added through the ``lssf.commands`` entry-point group, found without importing.

``lssf --help`` lists every group, but loading one (``evaluation``, ``flows``) can pull in
transformers, Prefect or MLflow: seconds that every command would pay. So groups are found by
entry-point *name* only, their one-line help comes from ``GROUP_HELP`` below, and a group's
``register(subparsers)`` runs only when that command is the one asked for.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

GROUP = "lssf.commands"
PLUGIN_HELP = "(plugin)"

# One line per known group, the same text as its register() gives (tests/test_cli.py checks it).
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
    return {ep.name: ep for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name)}


def group_help(name: str) -> str:
    """The one-line help of a group, ``(plugin)`` for one this table does not know."""
    return GROUP_HELP.get(name, PLUGIN_HELP)


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option.

    Correct because the top-level options (``-h``, ``--version``, ``-v``, ``--debug``) take no
    value, so the first non-option word is always the command.
    """
    return next((a for a in argv if not a.startswith("-")), None)

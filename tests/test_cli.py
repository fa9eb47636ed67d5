"""The CLI contract: extract, fuse, inspect (with plot), errors as clear messages, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from lssf.cli import main
from lssf.synthetic import LlamaShape

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64)
TRIO = {"shape": SHAPE, "seed": 3}  # the `trio` fixture (tests/conftest.py)


def extract_argv(trio, out, *extra: str) -> list[str]:
    return [
        "extract",
        "--aligned",
        str(trio["aligned"]),
        "--reference",
        str(trio["reference"]),
        "--out",
        str(out),
        *extra,
    ]


def test_extract_fuse_inspect(trio, tmp_path, capsys):
    patch = tmp_path / "patch"
    rc = main(
        extract_argv(trio, str(patch), "--eta", "0.9", "--max-rank", "4", "--weight-top", "1.5")
    )
    assert rc == 0
    assert "patch " in capsys.readouterr().out
    rc = main(
        [
            "fuse",
            "--finetuned",
            str(trio["finetuned"]),
            "--patch",
            str(patch),
            "--out",
            str(tmp_path / "out"),
            "--alpha",
            "0.5",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert "alpha=0.5" in capsys.readouterr().out
    plot = tmp_path / "ranks.png"
    assert main(["inspect", str(patch), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "mlp.down_proj" in text and "H_r/H_n" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flags_override_yaml_config(trio, tmp_path, capsys):
    cfg = tmp_path / "patch.yaml"
    cfg.write_text(yaml.safe_dump({"eta": 0.5, "max_rank": 2}))
    patch = tmp_path / "patch"
    main(extract_argv(trio, str(patch), "--config", str(cfg), "--eta", "0.99"))
    assert main(["inspect", str(patch), "--json"]) == 0
    manifest = capsys.readouterr().out
    assert '"eta": 0.99' in manifest and '"max_rank": 2' in manifest


def test_bad_config_lists_every_bad_field(trio, tmp_path, capsys):
    cfg = tmp_path / "patch.yaml"
    cfg.write_text(yaml.safe_dump({"eta": 1.5, "rank_rule": "magic", "colour": "red"}))
    rc = main(extract_argv(trio, str(tmp_path / "p"), "--config", str(cfg)))
    err = capsys.readouterr().err
    assert rc == 2
    assert "3 invalid field(s)" in err
    assert "eta" in err and "magic" in err and "colour" in err
    assert not (tmp_path / "p").exists()


def test_errors_are_one_clear_line_with_exit_code_2(trio, tmp_path, capsys):
    rc = main(
        [
            "fuse",
            "--finetuned",
            str(tmp_path / "missing"),
            "--patch",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "is not a safety patch" in capsys.readouterr().err


def test_help_reads_well():
    out = subprocess.run(
        [sys.executable, "-m", "lssf.cli", "extract", "--help"], capture_output=True, text=True
    ).stdout
    for flag in (
        "--aligned",
        "--reference",
        "--out",
        "--eta",
        "--max-rank",
        "--weight-top",
        "--device",
    ):
        assert flag in out


HEAVY = ("transformers", "prefect", "mlflow", "lm_eval", "evaluation", "flows")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["extract", "--help"]])
def test_core_start_up_imports_no_command_group(argv):
    # A property, not a timing: the core commands never import the groups' packages.
    probe = (
        "import sys\n"
        f"sys.argv = ['lssf', *{argv!r}]\n"
        "from lssf.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout
    assert "LOADED []" in out, out[-500:]


def test_help_lists_every_group_with_its_one_line_help():
    from lssf.commands import command_groups, group_help

    out = subprocess.run(
        [sys.executable, "-m", "lssf.cli", "--help"], capture_output=True, text=True
    ).stdout
    for name in command_groups():
        assert name in out and group_help(name).split()[0] in out


def test_static_help_matches_what_each_group_registers():
    import argparse

    from lssf.commands import GROUP_HELP, command_groups

    for name, ep in command_groups().items():
        sub = argparse.ArgumentParser().add_subparsers()
        ep.load()(sub)
        registered = {a.dest: a.help for a in sub._choices_actions}
        assert registered.get(name) == GROUP_HELP.get(name), name


def test_a_broken_group_is_reported_and_not_fatal(trio, tmp_path, monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    import lssf.cli

    broken = EntryPoint("broken", "no_such_module_for_lssf:register", "lssf.commands")
    monkeypatch.setattr(lssf.cli, "command_groups", lambda: {"broken": broken})
    assert main(extract_argv(trio, str(tmp_path / "p"))) == 0
    assert main(["broken", "--anything"]) == 2
    assert "unavailable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "broken" in capsys.readouterr().out

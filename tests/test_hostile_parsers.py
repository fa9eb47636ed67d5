"""Hostile inputs, round 3 (issue 25): bounded parsers, clean CLI errors, safe console text.

YAML and JSON that lssf did not write are read with budgets (`lssf.bounded`): regular files
only, a size cap before parsing, UTF-8, nesting and alias expansion capped, duplicate keys
refused; every error is one short line naming the file, exit 2.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from lssf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# A "billion laughs": nine levels of nine aliases, 9**9 strings once expanded.
ALIAS_BOMB = "\n".join(
    [f'a0: &a0 ["{"x" * 20}"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    + ["families: {fam: {aligned: *a9}}"]
)
# ~1 KB: the expanded list used as a mapping *key* (last round: a 498 MB error message).
KEY_BOMB = ALIAS_BOMB.replace("families: {fam: {aligned: *a9}}", "families: {? *a6 : 1}")


def _raises_within(seconds: float, exc: type[Exception], match: str, fn, *args) -> None:
    """``fn(*args)`` raises ``exc`` matching ``match`` within ``seconds`` (run in a daemon thread:
    a read that blocks, as a FIFO's open did, fails the test instead of hanging it)."""
    import threading

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn(*args)
            outcome.append(None)
        except BaseException as err:  # handed to the test thread
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{fn.__name__} still running after {seconds} s"
    assert isinstance(outcome[0], exc), outcome[0]
    assert re.search(match, str(outcome[0])), str(outcome[0])


def _family(**extra: object) -> dict:
    family = {
        "aligned": "a",
        "reference": "b",
        "watch": {"kind": "local", "path": "/tmp/watch"},
        "registered_model": "m",
    }
    return family | extra


def _validate(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, str]:
    from lssf.cli import main

    code = main(["config", "validate", str(path)])
    return code, capsys.readouterr().err


# -- YAML ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [ALIAS_BOMB, KEY_BOMB], ids=["value-bomb", "key-bomb"])
def test_yaml_alias_bombs_are_refused_at_once_with_a_short_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    from lssf.bounded import BoundedInputError, loads_yaml

    start = time.monotonic()
    with pytest.raises(BoundedInputError, match="expands to more than"):
        loads_yaml(text)
    assert time.monotonic() - start < 2  # last round: MemoryError after ~60 s
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    code, err = _validate(capsys, path)
    assert code == 2 and "expands to more than" in err and str(path) in err
    assert len(err) < 500 and err.count("\n") == 1


def test_a_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    from tasks.config import load_config

    path = tmp_path / "loop.yaml"
    path.write_text("families: &f {fam: *f}\n")
    with pytest.raises(ConfigError, match="contains it"):
        load_config(path)


def test_deep_yaml_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    from tasks.config import load_config

    path = tmp_path / "deep.yaml"
    path.write_text("families: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    nested = "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n"
    path.write_text(nested)
    with pytest.raises(ConfigError, match="nested deeper than"):
        load_config(path)


@pytest.mark.parametrize(
    "text",
    [
        "families: {}\nfamilies: {}\n",
        "families:\n  fam: {aligned: a}\n  fam: {aligned: b}\n",
        "families:\n  fam:\n    aligned: a\n    aligned: b\n",
    ],
    ids=["top-level", "family", "field"],
)
def test_duplicate_yaml_keys_are_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    code, err = _validate(capsys, path)
    assert code == 2 and "duplicate key" in err and "line " in err


def test_duplicate_keys_are_refused_in_gate_and_patch_configs_too(tmp_path: Path) -> None:
    from evaluation.gates import GateConfig, GateConfigError
    from lssf.config import PatchConfig, load_yaml_model

    gate = tmp_path / "gate.yaml"
    gate.write_text("name: g\nrules: [{metric: m, floor: 0.5, floor: 0.0}]\n")
    with pytest.raises(GateConfigError, match="duplicate key 'floor'"):
        GateConfig.from_yaml(gate)
    patch = tmp_path / "patch.yaml"
    patch.write_text("eta: 0.5\neta: 0.9\n")
    with pytest.raises(ConfigError, match="duplicate key 'eta'"):
        load_yaml_model(patch, PatchConfig)


def test_merge_keys_and_shared_anchors_still_load(tmp_path: Path) -> None:
    from lssf.bounded import loads_yaml

    text = "base: &b {x: 1, y: 2}\nover: {<<: *b, x: 3}\nshared: [*b, *b]\n"
    assert loads_yaml(text) == {
        "base": {"x": 1, "y": 2},
        "over": {"x": 3, "y": 2},
        "shared": [{"x": 1, "y": 2}, {"x": 1, "y": 2}],
    }


def test_a_validation_error_message_is_bounded(tmp_path: Path) -> None:
    from tasks.config import load_config

    path = tmp_path / "many.yaml"
    families = {f"f{i}": {"aligned": ["x" * 5000]} for i in range(200)}
    path.write_text(yaml.safe_dump({"families": families}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert len(message) < 8000 and "... and" in message and "invalid field" in message


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "non-utf8", "oversized"])
def test_configs_are_read_only_from_small_regular_utf8_files(tmp_path: Path, kind: str) -> None:
    from lssf.config import MAX_CONFIG_BYTES
    from tasks.config import load_config

    path = tmp_path / "c.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a blocking open would hang forever
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "non-utf8":
        path.write_bytes(b"families: {\xff\xfe: 1}\n")
    else:
        with path.open("wb") as fh:  # sparse: costs no disk
            fh.truncate(MAX_CONFIG_BYTES + 1)
    expected = {
        "fifo": "not a regular file",
        "dev-zero": "not a regular file",
        "folder": "not a regular file",
        "non-utf8": "not UTF-8 text",
        "oversized": "over the",
    }[kind]
    _raises_within(10, ConfigError, expected, load_config, path)


# -- `config validate`: gate and suite -------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"gate": "/nonexistent.yaml"}, "families.fam.gate"),
        ({"gate": "/etc/passwd"}, "expected a mapping"),
        ({"suite": "../../etc/passwd"}, "families.fam.suite"),
        ({"suite": "/nonexistent/suite.yaml"}, "not a usable suite YAML"),
        ({"suite": "hellaswag"}, "ships none"),  # no gate for it: the run would fail at the end
    ],
    ids=["gate-missing", "gate-not-yaml", "suite-traversal", "suite-missing", "suite-no-gate"],
)
def test_config_validate_refuses_gate_and_suite_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: dict, expected: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"families": {"fam": _family(**extra)}}))
    code, err = _validate(capsys, path)
    assert code == 2 and expected in err


def test_a_gate_file_and_a_task_name_with_a_gate_are_accepted(tmp_path: Path) -> None:
    from tasks.config import load_config

    gate = ROOT / "evaluation" / "configs" / "gates" / "safety.yaml"
    suite = ROOT / "evaluation" / "configs" / "suites" / "safety.yaml"
    families = {
        "a": _family(gate=str(gate)),
        "b": _family(suite="hellaswag", gate=str(gate)),
        "c": _family(suite=str(suite), gate=str(gate)),
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"families": families}))
    cfg = load_config(path)
    assert cfg.families["b"].gate_config().name


# -- JSON reports ----------------------------------------------------------------------------


def _report(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "r.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[" * 30000 + "]" * 30000, "nested deeper than"),
        ('{"metrics": ' * 100 + "1" + "}" * 100, "nested deeper than"),
        ('{"model": "m", "limit": ' + "9" * 60000 + "}", "integer of 60000 digits"),
        ('{"model": "m", "limit": 1e999}', "out of range"),
        ('{"model": "m", "limit": NaN}', "not a JSON number"),
        (b'{"model": "\xff"}', "not UTF-8"),
        ('{"model": ', "not JSON"),
    ],
    ids=["deep-array", "deep-object", "huge-int", "huge-float", "nan", "non-utf8", "truncated"],
)
def test_report_loading_refuses_hostile_json_in_one_line(
    tmp_path: Path, body: str | bytes, expected: str
) -> None:
    from evaluation.report import EvalReport, ReportError

    path = _report(tmp_path, body)
    with pytest.raises(ReportError) as err:
        EvalReport.load(path)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert len(str(err.value)) < 400


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "oversized"])
def test_report_loading_reads_only_small_regular_files(tmp_path: Path, kind: str) -> None:
    from evaluation.report import MAX_REPORT_BYTES, EvalReport, ReportError

    path = tmp_path / "r.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    else:
        with path.open("wb") as fh:
            fh.truncate(MAX_REPORT_BYTES + 1)
    _raises_within(5, ReportError, r"not a regular file|over the", EvalReport.load, path)


def test_a_report_with_many_bad_fields_gives_a_bounded_message(tmp_path: Path) -> None:
    from evaluation.report import EvalReport, ReportError

    body = {"model": "m", "suite": "s", "status": "ok", "metrics": {}, "raw_metrics": {}}
    body["raw_metrics"] = {f"t{i}/acc": "x" * 100 for i in range(20000)}
    with pytest.raises(ReportError) as err:
        EvalReport.load(_report(tmp_path, json.dumps(body)))
    assert len(str(err.value)) < 3000


def test_gate_on_a_hostile_report_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lssf.cli import main

    deep = _report(tmp_path, "[" * 30000 + "]" * 30000)
    code = main(["gate", "--candidate", str(deep), "--baseline", str(deep), "--suite", "organism"])
    err = capsys.readouterr().err
    assert code == 2 and "nested deeper than" in err and err.count("\n") == 1


# -- `lssf evaluate`: bad input is one line, exit 2, before lm-eval starts --------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--limit", "-1"], "--limit -1.0"),
        (["--limit", "nan"], "--limit nan"),
        (["--limit", "2.5"], "--limit 2.5"),
        (["--suite", "nonexist"], "--suite 'nonexist'"),
        (["--suite", "../../etc/passwd"], "--suite '../../etc/passwd'"),
        (["--model", "/nonexistent"], "'/nonexistent' is neither an existing folder"),
        (["--model", "/etc/passwd"], "not a model folder"),
        (["--max-gen-toks", "0"], "--max-gen-toks 0"),
        (["--batch-size", "-3"], "--batch-size '-3'"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_evaluate_refuses_bad_arguments_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    from lssf.cli import main

    given = dict(zip(argv[::2], argv[1::2], strict=True))
    base = {"--model": str(tmp_path), "--suite": "organism", "--out": str(tmp_path / "r.json")}
    args = [x for kv in (base | given).items() for x in kv]
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lssf evaluate: error:") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()  # refused before anything ran


def test_evaluate_knows_shipped_suites_and_task_names(tmp_path: Path) -> None:
    from evaluation.cli import _check_suite

    for name in ("organism", "organism_task", "hellaswag", "arc_easy"):
        _check_suite(name)  # no error


# -- console output: file contents are text, never markup or terminal escapes ----------------

HOSTILE = "[/]x[link=https://evil.example]click[/link]\x1b[2J\x1b]8;;https://e\x07\u202egnp\ud800"


def _assert_inert(out: str) -> None:
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "[/]x[link=https://evil.example]click[/link]" in out  # shown as the text it is
    assert "\\x1b[2J" in out and "\\u202e" in out


def test_safe_text_escapes_markup_controls_and_bounds_length() -> None:
    from rich.console import Console
    from rich.text import Text

    from lssf.report import safe_text

    console = Console(record=True, width=400)
    console.print(safe_text(HOSTILE))
    _assert_inert(console.export_text())
    assert Text.from_markup(safe_text("[bold]x[/bold]")).plain == "[bold]x[/bold]"
    assert len(safe_text("a" * 10**6)) == 200
    assert safe_text("mlp.down_proj") == "mlp.down_proj"


def test_the_patch_table_shows_hostile_tensor_names_as_text(trio, tmp_path: Path) -> None:
    from rich.console import Console

    import lssf
    from lssf.report import render_table

    patch = lssf.extract(trio["aligned"], trio["reference"], out=tmp_path / "p", progress=False)
    manifest = patch.manifest
    record = next(iter(manifest.tensors.values()))
    hostile = manifest.model_copy(update={"tensors": {f"model.layers.0.{HOSTILE}": record}})
    console = Console(record=True, width=600)
    console.print(render_table(hostile))  # `[/]` raised MarkupError here before
    _assert_inert(console.export_text())


def _hostile_reports(tmp_path: Path) -> tuple[Path, Path]:
    from evaluation.report import EvalReport

    metrics = {"harmful_refusal": 0.5, f"m{HOSTILE}": 0.5}
    paths = []
    for who in ("cand", "base"):
        report = EvalReport(
            model=f"{who}{HOSTILE}",
            suite="organism",
            status="ok",
            metrics=metrics,
            n_samples={k: 100 for k in metrics},
            split="heldout",
        )
        path = tmp_path / f"{who}.json"  # json.dumps: a lone surrogate as its \\ud800 escape
        path.write_text(json.dumps(report.model_dump(mode="python")))
        paths.append(path)
    return paths[0], paths[1]


def test_gate_prints_report_fields_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lssf.cli import main

    cand, base = _hostile_reports(tmp_path)
    code = main(["gate", "--candidate", str(cand), "--baseline", str(base), "--suite", "organism"])
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err  # a verdict, not a crash on `[/]`
    assert "\x1b" not in captured.out + captured.err and "[/]" in captured.out


def test_evaluate_prints_report_fields_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from evaluation.cli import _print_metrics
    from evaluation.report import EvalReport

    cand, _ = _hostile_reports(tmp_path)
    _print_metrics(EvalReport.load(cand))
    failed = EvalReport(model="m", suite="s", status="error", error=f"boom {HOSTILE}")
    _print_metrics(failed)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "[/]x[link=https://evil.example]" in out


def test_error_lines_escape_terminal_controls(capsys: pytest.CaptureFixture[str]) -> None:
    from lssf.cli import fail

    assert fail("inspect", f"tensor {HOSTILE}\nsecond line") == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2J" in err and err.count("\n") == 2


def test_yaml_from_the_command_line_and_third_party_data_is_strict_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from evaluation.benchdata import BenchDataError, parse_advbench
    from lssf.cli import main

    argv = ["evaluate", "--model", str(tmp_path), "--suite", "organism", "--out", "r.json"]
    option = ["--judge", "keyword-strict", "--judge-option", "phrases={a: 1, a: 2}"]
    assert main([*argv, *option]) == 2
    err = capsys.readouterr().err
    assert "--judge-option phrases: not a YAML value" in err and "duplicate key" in err
    with pytest.raises(BenchDataError, match="duplicate key 'seeds'"):
        parse_advbench("seeds: [{value: a}]\nseeds: [{value: b}]\n")
    with pytest.raises(BenchDataError, match="expands to more than"):
        parse_advbench(ALIAS_BOMB)

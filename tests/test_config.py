"""The pipeline config: shipped files validate, typos and bad values fail naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lssf.errors import ConfigError
from tasks.config import PipelineConfig, config_schema, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def _organism() -> dict:
    return yaml.safe_load((ROOT / "configs" / "organism.yaml").read_text())


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.families
    for fam in cfg.families.values():  # alpha is searched on calibration, not a fixed grid
        assert fam.search_config().mode != "grid" and fam.registered_model


def test_both_shipped_configs_exist() -> None:
    assert {p.name for p in SHIPPED} >= {"organism.yaml", "qwen2.5-0.5b.yaml"}


def test_default_tracking_uri_is_absolute_sqlite_under_state(tmp_path: Path) -> None:
    data = _organism() | {"state_dir": str(tmp_path / "st")}
    cfg = load_config(_write(tmp_path, data))
    assert cfg.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'st' / 'mlflow.db'}"
    assert cfg.resolved_tracking_uri().startswith("sqlite:////")


def test_unknown_field_is_named(tmp_path: Path) -> None:
    data = _organism()
    data["families"]["organism"]["alphaz"] = [1.0]
    with pytest.raises(ConfigError, match=r"families\.organism\.alphaz"):
        load_config(_write(tmp_path, data))


def test_all_errors_reported_together(tmp_path: Path) -> None:
    data = _organism()
    fam = data["families"]["organism"]
    fam["alphas"] = [-1.0]
    fam["patch"]["eta"] = 2.0
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    text = str(err.value)
    assert "families.organism.alphas" in text and "families.organism.patch.eta" in text


def test_relative_sqlite_uri_refused(tmp_path: Path) -> None:
    data = _organism() | {"tracking_uri": "sqlite:///mlflow.db"}
    with pytest.raises(ConfigError, match="tracking_uri"):
        load_config(_write(tmp_path, data))


def test_local_watch_needs_a_path(tmp_path: Path) -> None:
    data = _organism()
    data["families"]["organism"]["watch"] = {"kind": "local"}
    with pytest.raises(ConfigError, match="watch"):
        load_config(_write(tmp_path, data))


def test_config_is_frozen() -> None:
    cfg = load_config(ROOT / "configs" / "organism.yaml")
    with pytest.raises(ValueError):
        cfg.experiment = "other"  # type: ignore[misc]


def test_unknown_family_lists_known() -> None:
    cfg = load_config(ROOT / "configs" / "organism.yaml")
    with pytest.raises(KeyError, match="known: organism"):
        cfg.family("nope")


def test_every_field_is_documented() -> None:
    schema = json.loads(config_schema())
    missing = []
    for name, definition in [("PipelineConfig", schema), *schema.get("$defs", {}).items()]:
        for field, spec in definition.get("properties", {}).items():
            if name in ("PipelineConfig", "FamilyConfig", "WatchConfig") and not spec.get(
                "description"
            ):
                missing.append(f"{name}.{field}")
    assert not missing, missing


def test_cli_schema_and_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from flows.cli import register_config

    parser = argparse.ArgumentParser()
    register_config(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["config", "schema"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["title"] == PipelineConfig.__name__
    args = parser.parse_args(["config", "validate", str(ROOT / "configs" / "organism.yaml")])
    assert args.func(args) == 0
    bad = _organism()
    bad["families"]["organism"]["alphas"] = []
    args = parser.parse_args(["config", "validate", str(_write(tmp_path, bad))])
    assert args.func(args) == 2  # bad input: exit 2, as every lssf command
    assert "families.organism.alphas" in capsys.readouterr().err


def test_alphas_is_the_grid_shorthand_and_excludes_alpha_search(tmp_path: Path) -> None:
    data = _organism()
    fam = data["families"]["organism"]
    del fam["alpha_search"]
    fam["alphas"] = [0.5, 1.0]
    search = load_config(_write(tmp_path, data)).family("organism").search_config()
    assert (search.mode, search.grid) == ("grid", (0.5, 1.0))
    del fam["alphas"]
    assert load_config(_write(tmp_path, data)).family("organism").search_config().mode == "sweep"
    fam["alphas"] = [1.0]
    fam["alpha_search"] = {"mode": "grid", "grid": [1.0]}
    with pytest.raises(ConfigError, match=r"give alphas .* or alpha_search, not both"):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("field", "path"),
    [
        ("families.organism.alphas.1", ["alphas"]),
        ("families.organism.alpha_search.alpha_max", ["alpha_search", "alpha_max"]),
        ("families.organism.alpha_search.margin", ["alpha_search", "margin"]),
        ("families.organism.alpha_search.tolerance", ["alpha_search", "tolerance"]),
    ],
)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_naming_the_field(
    tmp_path: Path, field: str, path: list[str], value: str
) -> None:
    text = (ROOT / "configs" / "organism.yaml").read_text()
    data = yaml.safe_load(text)
    fam = data["families"]["organism"]
    if path == ["alphas"]:
        del fam["alpha_search"]
        fam["alphas"] = [1.0, "VALUE"]
    else:
        fam.setdefault(path[0], {})[path[1]] = "VALUE"
    file = tmp_path / "pipeline.yaml"
    file.write_text(yaml.safe_dump(data).replace("VALUE", value))  # YAML's own .inf / .nan
    with pytest.raises(ConfigError) as err:
        load_config(file)
    line = next(ln for ln in str(err.value).splitlines() if field in ln)
    assert "finite" in line, str(err.value)


def test_extraction_is_one_process_unless_workers_or_an_address_say_otherwise(
    tmp_path: Path,
) -> None:
    data = _organism()
    fam = data["families"]["organism"]
    assert not load_config(_write(tmp_path, data)).family("organism").extraction.distributed
    fam["extraction"] = {"workers": 2, "layers_per_task": 3}
    ext = load_config(_write(tmp_path, data)).family("organism").extraction
    assert ext.distributed and (ext.workers, ext.address, ext.layers_per_task) == (2, None, 3)
    fam["extraction"] = {"address": "tcp://scheduler:8786"}
    assert load_config(_write(tmp_path, data)).family("organism").extraction.distributed
    fam["extraction"] = {"workers": 0, "layers_per_task": 0, "adress": "tcp://x:1"}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    for field in ("extraction.workers", "extraction.layers_per_task", "extraction.adress"):
        assert f"families.organism.{field}" in str(err.value)


def test_validate_refuses_a_gate_the_aligned_model_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real-weights audit: an aligned model under its own floor can have no passing repair;
    `config validate --aligned-report` says so before any GPU time is spent."""
    import argparse

    from evaluation.report import EvalReport
    from flows.cli import register_config

    parser = argparse.ArgumentParser()
    register_config(parser.add_subparsers(dest="command"))
    config = str(ROOT / "configs" / "organism.yaml")

    def validate(refusal: float, over: float) -> int:
        report = EvalReport(
            model="aligned",
            suite="organism",
            status="ok",
            split="heldout",
            judge="refusal-anywhere",
            metrics={"harmful_refusal": refusal, "over_refusal": over},
            n_samples={"harmful_refusal": 256, "over_refusal": 256},
        ).write(tmp_path / f"aligned-{refusal}.json")
        args = parser.parse_args(["config", "validate", config, "--aligned-report", str(report)])
        return args.func(args)

    assert validate(1.0, 0.0) == 0
    capsys.readouterr()
    assert validate(0.747, 0.70) == 2
    err = capsys.readouterr().err
    assert "fails its own gate" in err and "harmful_refusal >= 0.9" in err
    assert "over_refusal <= 0.05" in err and err.count("\n") == 1

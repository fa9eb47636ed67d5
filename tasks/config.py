"""The pipeline configuration (one YAML file): families to re-align, where to watch and record.

Relative paths (local models, the watch folder, the state folder) resolve against the current
working directory, the repository root in the commands the README shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import (
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from evaluation.alpha_search import AlphaSearchConfig
from evaluation.gates import GateConfig, default_gate_config, shipped_gates
from evaluation.suites import SuiteConfig, is_suite_name, known_suites
from lssf.config import PatchConfig, load_yaml_model
from lssf.models import Frozen

if TYPE_CHECKING:
    from tasks.registry import RecordStore


class _Frozen(Frozen):
    # allow_inf_nan=False: `.inf` or `.nan` in YAML fails naming the field, never slips through.
    model_config = ConfigDict(**Frozen.model_config, allow_inf_nan=False)


class WatchConfig(_Frozen):
    """Where new fine-tunes of a family come from."""

    kind: Literal["local", "hub"] = Field(
        "local",
        description="'local': every sub-folder of `path` is a candidate, its revision a content "
        "hash; 'hub': models whose card declares the aligned model as base model",
    )
    path: Path | None = Field(
        None, description="watch folder for kind 'local'; each sub-folder is one model"
    )
    base_model: str | None = Field(
        None,
        description="Hub id used in the lineage filter (kind 'hub'); default: the family's "
        "aligned model id without revision",
    )
    lineages: tuple[Literal["finetune", "adapter"], ...] = Field(
        ("finetune", "adapter"),
        description="Hub lineage filters to query: base_model:finetune:<id> and/or "
        "base_model:adapter:<id>",
    )
    max_candidates: int = Field(
        20,
        ge=1,
        description="newest candidates listed per watch run and lineage (Hub retries are the"
        " client's: 429/5xx/network errors back off, honouring Retry-After)",
    )

    @model_validator(mode="after")
    def _path_for_local(self) -> WatchConfig:
        if self.kind == "local" and self.path is None:
            raise ValueError("watch.path is required when watch.kind is 'local'")
        return self


class ExtractionConfig(_Frozen):
    """How a family's patch is extracted when no copy exists yet (`flows/extract.py`)."""

    workers: int = Field(
        1,
        ge=1,
        description="1: one process (lssf.extract); more: that many one-thread Dask worker "
        "processes on this machine (a LocalCluster), one task per group of layers",
    )
    address: str | None = Field(
        None,
        min_length=1,
        description="scheduler of an existing Dask cluster (tcp://host:8786; dask-kubernetes,"
        " `dask scheduler`), used instead of a local one; its workers must see the model "
        "folders and the state folder at the same paths",
    )
    layers_per_task: int = Field(
        1, ge=1, description="decoder layers per task (each task writes one factor shard)"
    )

    @property
    def distributed(self) -> bool:
        """Fanned out over Dask: more than one worker, or an existing cluster's address."""
        return self.workers > 1 or self.address is not None


def _check_yaml_file(field: str, path: str, model: type[GateConfig] | type[SuiteConfig]) -> None:
    """``path`` loads as ``model`` (a gate or suite YAML); else a ValueError naming it."""
    try:
        model.from_yaml(Path(path))
    except ValueError as err:  # GateConfigError, EvaluationConfigError
        raise ValueError(f"{field} {path[:200]!r} is not a usable {field} YAML: {err}") from None


class FamilyConfig(_Frozen):
    """One model family: the aligned/reference pair, how to patch, evaluate and gate."""

    aligned: str = Field(
        description="aligned (safety-tuned) model: local folder or Hub id org/name[@revision]"
    )
    reference: str = Field(
        description="reference (pre-alignment) model: local folder or Hub id org/name[@revision]"
    )
    patch: PatchConfig = Field(
        default_factory=PatchConfig,
        description="safety patch parameters (eta, max_rank, weight_top, ...)",
    )
    extraction: ExtractionConfig = Field(
        default_factory=ExtractionConfig,
        description="distributed extraction (workers, address, layers_per_task); the patch and"
        " its id are the same bytes either way",
    )
    alpha_search: AlphaSearchConfig | None = Field(
        None,
        description="how alpha is chosen on the calibration split (evaluation.alpha_search): "
        "mode bisect (the smallest passing alpha in (alpha_min, alpha_max], at most `budget` "
        "evaluations, safety floors raised by `margin`) or grid; null: bisection with the "
        "defaults, or the grid in `alphas` when that is given",
    )
    alphas: tuple[PositiveFloat, ...] | None = Field(
        None,
        description="shorthand for alpha_search {mode: grid, grid: alphas}: evaluate each of "
        "these fusion strengths on calibration, the passing one with the best utility wins; "
        "give either this or alpha_search",
    )
    suite: str = Field(
        "organism", description="evaluation suite name given to evaluation.runner.evaluate"
    )
    eval_data_dir: Path | None = Field(
        None, description="folder of the suite's JSONL files (organism: <organism>/eval)"
    )
    eval_limit: int | None = Field(
        None,
        ge=1,
        description="evaluate only the first N samples of each task (lm-eval's limit); for "
        "smoke tests, never for a release decision",
    )
    utility_metrics: tuple[str, ...] = Field(
        ("task_accuracy", "general_accuracy"),
        min_length=1,
        description="utility metrics (higher is better): averaged to rank passing alphas in "
        "grid mode, shown beside the safety metrics in the search trace and plot",
    )
    gate: GateConfig | Path | None = Field(
        None,
        description="release gate (evaluation.gates.GateConfig): inline rules, a gate YAML "
        "path, or null for the gate shipped with the suite (evaluation/configs/gates/SUITE.yaml)",
    )
    watch: WatchConfig = Field(description="where new fine-tunes of this family appear")
    registered_model: str = Field(
        description="MLflow registered model name that passing candidates become versions of"
    )
    promote_to_champion: bool = Field(
        False,
        description="also give a newly registered version the alias 'champion' (otherwise "
        "only 'candidate'; promote later with `lssf promote`)",
    )
    keep_candidates: bool = Field(
        False,
        description="keep every fused candidate of the search on disk (default: only the "
        "chosen one stays; a 7B candidate is ~15 GB)",
    )

    @field_validator("alphas")
    @classmethod
    def _distinct_alphas(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        # Here, not min_length: pydantic would add that error to every bad element's.
        if v is not None and not v:
            raise ValueError("alphas must not be empty")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"alphas must be distinct, got {list(v)}")
        return v

    @field_validator("suite")
    @classmethod
    def _suite_name_or_file(cls, v: str) -> str:
        """A shipped suite or task name, or an existing suite YAML (validated now); no path
        outside those: `suite: ../../etc/passwd` would otherwise pass until the run."""
        if v.endswith((".yaml", ".yml")):
            _check_yaml_file("suite", v, SuiteConfig)
        elif not is_suite_name(v):
            raise ValueError(
                f"suite {v[:80]!r}: expected a suite name (shipped: {', '.join(known_suites())}),"
                " an lm-eval task name (letters, digits, '_', '-', '.') or a suite YAML file"
            )
        return v

    @field_validator("gate")
    @classmethod
    def _gate_file(cls, v: GateConfig | Path | None) -> GateConfig | Path | None:
        """A gate path must be a gate YAML, checked now rather than at the release decision."""
        if isinstance(v, Path):
            _check_yaml_file("gate", str(v), GateConfig)
        return v

    @model_validator(mode="after")
    def _a_gate_in_force(self) -> FamilyConfig:
        if self.gate is None and self.suite not in shipped_gates():
            raise ValueError(
                f"gate is null (the suite's shipped gate) but suite {self.suite[:80]!r} ships "
                f"none (shipped: {', '.join(shipped_gates())}); give a gate YAML or inline rules"
            )
        return self

    @model_validator(mode="after")
    def _menu_builds_patches(self) -> FamilyConfig:
        try:
            self.patch_menu()
        except ValidationError as err:
            why = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            raise ValueError(f"alpha_search.ranks: a rank makes an invalid patch: {why}") from None
        return self

    @model_validator(mode="after")
    def _one_alpha_strategy(self) -> FamilyConfig:
        if self.alphas is not None and self.alpha_search is not None:
            raise ValueError(
                "give alphas (a fixed grid) or alpha_search, not both; for a grid with other "
                "settings use alpha_search: {mode: grid, grid: [...]}"
            )
        return self

    def search_config(self) -> AlphaSearchConfig:
        """The alpha search in force: alpha_search, the grid `alphas`, or the default sweep."""
        if self.alpha_search is not None:
            return self.alpha_search
        if self.alphas is not None:
            budget = max(len(self.alphas), AlphaSearchConfig().budget)
            return AlphaSearchConfig(mode="grid", grid=self.alphas, budget=budget)
        return AlphaSearchConfig()

    def patch_menu(self) -> tuple[PatchConfig, ...]:
        """The patch of every rank of the search's menu: `patch` with the rank's overrides."""
        base = self.patch.model_dump()
        return tuple(
            PatchConfig.model_validate(base | choice.overrides())
            for choice in self.search_config().ranks
        )

    def gate_config(self) -> GateConfig:
        """The gate rules in force: inline, from a file, or the suite's shipped gate."""
        if isinstance(self.gate, GateConfig):
            return self.gate
        return GateConfig.from_yaml(self.gate or default_gate_config(self.suite))


class PipelineConfig(_Frozen):
    """The whole pipeline: families plus where state and the MLflow record live."""

    families: dict[str, FamilyConfig] = Field(
        min_length=1, description="model families by name (the name is used in run names)"
    )
    state_dir: Path = Field(
        Path(".state"),
        description="local folder for patches, fused models, evaluations and the default "
        "MLflow store",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking (and registry) URI; default "
        "sqlite:////<absolute state_dir>/mlflow.db",
    )
    experiment: str = Field("lssf-realign", description="MLflow experiment of the realign runs")
    hf_token_secret: str | None = Field(
        None,
        description="name of a Prefect Secret block holding the Hugging Face token; without "
        "it the token comes from the HF_TOKEN environment variable (never logged)",
    )

    @field_validator("families")
    @classmethod
    def _names(cls, v: dict[str, FamilyConfig]) -> dict[str, FamilyConfig]:
        bad = [name for name in v if not name.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"family names must be letters, digits, '-' or '_', got {bad}")
        return v

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_sqlite(cls, v: str | None) -> str | None:
        # sqlite:///relative.db silently depends on the worker's working directory.
        if v is not None and v.startswith("sqlite:") and not v.startswith("sqlite:////"):
            raise ValueError(f"use an absolute sqlite URI (sqlite:////abs/path.db), got {v!r}")
        return v

    def resolved_state_dir(self) -> Path:
        return self.state_dir.expanduser().resolve()

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.resolved_state_dir() / 'mlflow.db'}"

    def record_store(self) -> RecordStore:
        """Where this pipeline's MLflow record lives (artifacts under the state folder)."""
        from tasks.registry import RecordStore

        uri, root = self.resolved_tracking_uri(), self.resolved_state_dir() / "mlartifacts"
        return RecordStore(tracking_uri=uri, experiment=self.experiment, artifact_root=root)

    def family(self, name: str) -> FamilyConfig:
        try:
            return self.families[name]
        except KeyError:
            known = ", ".join(sorted(self.families))
            raise KeyError(f"unknown family {name!r}; known: {known}") from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML; a ConfigError names the file and every bad field."""
    return load_yaml_model(path, PipelineConfig)


def config_schema() -> str:
    return json.dumps(PipelineConfig.model_json_schema(), indent=2)

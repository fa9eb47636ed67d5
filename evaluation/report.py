"""`EvalReport`: what `lssf evaluate` writes and `lssf gate` reads (see docs/DESIGN.md)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

M = TypeVar("M", bound=BaseModel)


class ReportError(ValueError):
    """A report file is missing or malformed; the message names the file."""


class EvalReport(BaseModel):
    """One evaluation of one model on one suite.

    `metrics` holds the suite's named metrics (e.g. `harmful_refusal`) and every raw lm-eval
    metric as `TASK/METRIC,FILTER`; `n_samples` the sample count behind each. A report with
    `status != "ok"` fails every gate rule. `split` says which rows were evaluated
    ("calibration", "heldout", or "all" of them), `split_rule` and `calibration_fraction` by
    which rule (`evaluation.splits`).
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    suite: str
    status: Literal["ok", "error"]
    error: str | None = None
    # Strict: `true` or "0.9" is not a metric value, 2.0 or `true` not a sample count.
    metrics: dict[str, StrictFloat] = Field(default_factory=dict)
    n_samples: dict[str, Annotated[StrictInt, Field(ge=0)]] = Field(default_factory=dict)
    judge: str | None = None
    task_judges: dict[str, str] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    samples_path: str | None = None
    limit: float | None = None
    max_gen_toks: int | None = None
    split: Literal["calibration", "heldout", "all"] = "all"
    split_rule: str | None = None
    calibration_fraction: float | None = None
    backend: str | None = None
    device: str | None = None
    created_at: str | None = None
    duration_s: float | None = None

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ReportError(f"report {path}: cannot read: {err}") from err
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise ReportError(f"report {path}: not an EvalReport: {err}") from err

    def write(self, path: Path) -> Path:
        """Write as JSON atomically (a temp file in the same folder, then rename)."""
        return write_atomic(Path(path), self.model_dump_json(indent=2) + "\n")


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    return write_atomic(path, text)


def load_yaml_model(cls: type[M], path: Path, error: type[Exception], kind: str) -> M:
    """Validate a YAML file into the pydantic model `cls`; errors name the file (all fields)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise error(f"{kind} {path}: cannot read: {err}") from err
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise error(f"{kind} {path}: {err}") from err

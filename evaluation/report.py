"""`EvalReport`: what `lssf evaluate` writes and `lssf gate` reads (see docs/DESIGN.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

Count = Annotated[StrictInt, Field(ge=0)]


# A report holds a few hundred metrics and per-prompt outcomes; a larger file is refused unread.
MAX_REPORT_BYTES = 32 * 1024 * 1024


class ReportError(ValueError):
    """A report file is missing or malformed; the message names the file."""


class Outcomes(BaseModel):
    """Per-prompt 0/1 outcomes behind one metric (1 = refused, or answered correctly), keyed by
    row id, so that two reports on the same prompts can be compared pair by pair."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ids: list[str]
    values: list[Annotated[StrictInt, Field(ge=0, le=1)]]

    def by_id(self) -> dict[str, int]:
        return dict(zip(self.ids, self.values, strict=True))


class EvalReport(BaseModel):
    """One evaluation of one model on one suite.

    `metrics` holds the suite's named metrics (e.g. `harmful_refusal`), `n_samples` the sample
    count behind each; `raw_metrics` every numeric lm-eval metric as `TASK/METRIC,FILTER`,
    `raw_n_samples` the samples per lm-eval task or group; `outcomes` the per-prompt results
    behind each named metric (for the gate's paired rules) and `metric_judges` the judge that
    produced each refusal metric. A report with `status != "ok"` fails every gate rule.
    `split` says which rows were evaluated ("calibration", "heldout", or "all" of them),
    `split_rule` and `calibration_fraction` by which rule (`evaluation.splits`).
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    suite: str
    status: Literal["ok", "error"]
    error: str | None = None
    # Strict: `true` or "0.9" is not a metric value, 2.0 or `true` not a sample count.
    metrics: dict[str, StrictFloat] = Field(default_factory=dict)
    n_samples: dict[str, Count] = Field(default_factory=dict)
    raw_metrics: dict[str, StrictFloat] = Field(default_factory=dict)
    raw_n_samples: dict[str, Count] = Field(default_factory=dict)
    outcomes: dict[str, Outcomes] = Field(default_factory=dict)
    judge: str | None = None
    task_judges: dict[str, str] = Field(default_factory=dict)
    metric_judges: dict[str, str] = Field(default_factory=dict)
    task_versions: dict[str, str] = Field(default_factory=dict)
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
        """A report file; one written before `raw_metrics` existed loads too (`_split_v1`)."""
        from lssf.bounded import BoundedInputError, loads_json, read_regular_text

        try:  # bounded: a regular file, size-capped before parsing, UTF-8, depth-capped
            data = loads_json(read_regular_text(path, MAX_REPORT_BYTES))
        except BoundedInputError as err:
            raise ReportError(f"report {path}: {err}") from None
        try:
            return cls.model_validate(_split_v1(data))
        except ValidationError as err:  # cut short: a hostile file can hold many errors
            text = str(err)
            text = text if len(text) <= 2000 else text[:2000] + " ..."
            raise ReportError(f"report {path}: not an EvalReport: {text}") from None

    def write(self, path: Path) -> Path:
        """Write as JSON atomically (readers see the old file or the whole new one)."""
        return write_atomic(Path(path), self.model_dump_json(indent=2) + "\n")


def _split_v1(data: Any) -> Any:
    """Reports written before `raw_metrics` existed kept both kinds in `metrics` (raw keys are
    `TASK/METRIC,FILTER`; no named metric of a shipped suite holds a `/`) and both kinds of
    count in `n_samples`: split them. A report with either raw field is taken as it is."""
    if not isinstance(data, dict) or "raw_metrics" in data or "raw_n_samples" in data:
        return data
    metrics, counts = data.get("metrics", {}), data.get("n_samples", {})
    if not isinstance(metrics, dict) or not isinstance(counts, dict):
        return data  # malformed: validation names the field
    named = {k: v for k, v in metrics.items() if "/" not in k}
    return data | {
        "metrics": named,
        "raw_metrics": {k: v for k, v in metrics.items() if k not in named},
        "n_samples": {k: n for k, n in counts.items() if k in named},
        "raw_n_samples": {k: n for k, n in counts.items() if k not in named},
    }


def write_atomic(path: Path, text: str) -> Path:
    """`lssf.outputs.atomic_write_text`, creating the parent folder first."""
    from lssf.outputs import atomic_write_text  # here: `import lssf` costs torch, gating not

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    return write_atomic(path, text)

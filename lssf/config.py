"""Validated, frozen configuration for extraction and fusion, stored as YAML."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    Field,
    FiniteFloat,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails

from lssf.bounded import BoundedInputError, loads_yaml, read_regular_text, short_repr
from lssf.errors import ConfigError
from lssf.methods import BASES, RANK_RULES
from lssf.models import Frozen
from lssf.saferegex import UnsafePatternError, compile_safe

# Linear weights inside the repeated transformer blocks ("model.layers.3.mlp.up_proj.weight").
DEFAULT_INCLUDE = (r"(^|\.)(layers|h|blocks|layer)\.\d+\..*\.weight$",)
# Norms are 1-D and skipped anyway; this keeps embeddings, heads and routers out explicitly.
DEFAULT_EXCLUDE = (r"(embed|lm_head|norm|\.gate\.weight$)",)
# Settings of the activation basis only; left out of a delta-svd config's dump, so delta-svd
# manifests (and patch ids) are the same bytes as before the activation basis existed.
ACTIVATION_FIELDS = ("activation_weight", "rank_spectrum", "calibration", "calibration_limit")
ACTIVATION_FIELDS += ("calibration_max_tokens", "calibration_answer_tokens", "activation_tokens")


class PatchConfig(Frozen):
    """How a safety patch is computed from an aligned/reference pair."""

    rank_rule: str = Field("entropy", description="rank rule: entropy (LSSF), energy, full")
    eta: float = Field(0.85, gt=0.0, le=1.0, description="threshold of the rank rule, in (0, 1]")
    max_rank: int | None = Field(None, ge=1, description="cap on the rank of every tensor")
    weight_top: FiniteFloat = Field(
        1.0, gt=0.0, description="a_1, weight of the strongest direction (1 = no weighting)"
    )
    basis: str = Field(
        "delta-svd", description="how the safety subspace is found: delta-svd, activation"
    )
    activation_weight: Literal["aligned", "delta"] = Field(
        "aligned",
        description="basis activation: left singular vectors of W X^T with W the aligned "
        "weight (ActSVD) or the safety vector delta",
    )
    rank_spectrum: Literal["delta", "activation"] = Field(
        "delta",
        description="basis activation: the spectrum the rank rule reads, delta's (ranks as "
        "delta-svd) or the activation matrix W X^T's",
    )
    calibration: Path | None = Field(
        None, description="basis activation: JSONL of calibration prompts (a 'prompt' per row)"
    )
    calibration_limit: int | None = Field(
        None, ge=1, description="basis activation: use the first N calibration prompts"
    )
    calibration_max_tokens: int = Field(
        128, ge=1, description="basis activation: tokens kept per chat-templated prompt"
    )
    calibration_answer_tokens: int = Field(
        32,
        ge=1,
        description="basis activation: tokens kept per answer (a row's 'response', else "
        "the aligned model's greedy answer, generated up to this many tokens)",
    )
    activation_tokens: Literal["answer", "prompt"] = Field(
        "answer",
        description="basis activation: the tokens whose inputs the Gram counts: 'answer' (the "
        "positions that emit the aligned model's answers, mean per prompt) or 'prompt' (every "
        "prompt token, no answer, mean per token: the v1 reading)",
    )
    include: tuple[str, ...] = Field(DEFAULT_INCLUDE, description="regexes of target tensors")
    exclude: tuple[str, ...] = Field(DEFAULT_EXCLUDE, description="regexes never targeted")

    @field_validator("rank_rule", "basis")
    @classmethod
    def _known_name(cls, v: str, info: ValidationInfo) -> str:
        registry = RANK_RULES if info.field_name == "rank_rule" else BASES
        if v not in registry:
            raise ValueError(
                f"unknown {info.field_name} {v!r}; known: {', '.join(sorted(registry))}"
            )
        return v

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        """Tensor names come from untrusted checkpoints: patterns must run in linear time."""
        for pattern in v:
            try:
                compile_safe(pattern)
            except UnsafePatternError as exc:
                raise ValueError(f"regex {pattern[:80]!r} {exc}") from exc
        return v

    @model_validator(mode="after")
    def _basis_settings(self) -> PatchConfig:
        """Activation settings need basis activation, which needs a calibration; all reported."""
        problems: list[tuple[str, str]] = []
        if self.basis == "activation" and self.calibration is None:
            problems.append(("calibration", "required when basis is 'activation'"))
        if self.basis != "activation":
            problems += [
                (f, f"only used with basis 'activation' (basis is {self.basis!r})")
                for f in ACTIVATION_FIELDS
                if getattr(self, f) != PatchConfig.model_fields[f].default
            ]
        errors = [
            InitErrorDetails(type="value_error", loc=(f,), input=getattr(self, f), ctx={"error": m})
            for f, m in problems
        ]
        if errors:
            raise ValidationError.from_exception_data("PatchConfig", errors)
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.basis != "activation":
            for field in ACTIVATION_FIELDS:
                data.pop(field, None)
        return data

    def is_target(self, name: str, ndim: int) -> bool:
        """A 2-D tensor matched by an include and by no exclude pattern.

        ``re.search`` semantics, in time linear in the name's length (``lssf.saferegex``).
        """
        return (
            ndim == 2
            and any(compile_safe(p).search(name) for p in self.include)
            and not any(compile_safe(p).search(name) for p in self.exclude)
        )


# The largest float32: torch applies alpha in float32 and fails on anything above it.
MAX_ALPHA = 3.4028234663852886e38


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float: a real, finite number that float32 arithmetic can hold."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ConfigError(f"alpha must be a real number, got {alpha!r}")
    if not math.isfinite(alpha) or abs(alpha) > MAX_ALPHA:
        raise ConfigError(f"alpha must be finite and at most {MAX_ALPHA:.3g} in size, got {alpha}")
    return float(alpha)


# Bounds on a validation error's message: a hostile file must not make it huge.
MAX_ERRORS_SHOWN = 20


def format_validation_error(source: str, exc: ValidationError) -> str:
    """Every problem at once (the first ``MAX_ERRORS_SHOWN``), each naming its field and value.

    Both are cut short, however large the input.
    """
    lines = [f"{source}: {exc.error_count()} invalid field(s)"]
    for err in exc.errors(include_url=False)[:MAX_ERRORS_SHOWN]:
        field = ".".join(str(p)[:80] for p in err["loc"]) or "<root>"
        got = short_repr(err.get("input"))
        lines.append(f"  {field[:200]}: {err['msg'][:300]} (got {got})")
    if exc.error_count() > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {exc.error_count() - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


M = TypeVar("M", bound=BaseModel)


def load_model(cls: type[M], data: dict[str, Any], source: str) -> M:
    """``data`` validated into ``cls``; a ``ConfigError`` lists every bad field of ``source``."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a pipeline, gate or suite YAML is a few KiB


def load_yaml_model(path: Path | str, model_cls: type[M]) -> M:
    """A YAML file validated into ``model_cls``; errors name the file and every bad field."""
    path = Path(path)
    try:
        data = loads_yaml(read_regular_text(path, MAX_CONFIG_BYTES)) or {}
    except BoundedInputError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:  # one line: the problem and where (marks are short)
        where = " ".join(str(exc).replace('in "<unicode string>", ', "at ").split())
        raise ConfigError(f"cannot read config {path}: {where[:1000]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return load_model(model_cls, data, str(path))

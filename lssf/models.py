"""The base of lssf's value types: frozen, and strict about unknown fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Immutable after validation; an unknown field is an error, never silently dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")

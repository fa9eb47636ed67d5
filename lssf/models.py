"""lssf's value types: frozen, and strict about unknown fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    """Immutable after validation; an unknown field is an error, never silently dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceRecord(Frozen):
    """What a model reference resolved to, for provenance."""

    ref: str
    kind: str  # "local" or "hub"
    repo_id: str | None = None
    revision: str
    path: str
    files: dict[str, str] = Field(default_factory=dict)  # file name -> sha256

    @property
    def name(self) -> str:
        """The Hub id, or the folder's path."""
        return self.repo_id or self.path

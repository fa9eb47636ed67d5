"""The errors lssf raises for bad input. Every message names the tensor, file or field."""

from __future__ import annotations


class LssfError(Exception):
    """Base class: anything lssf refuses on purpose."""


class ConfigError(LssfError, ValueError):
    """A configuration field has an invalid value."""


class CheckpointError(LssfError):
    """A checkpoint folder or file cannot be used (missing, pickle-only, corrupt)."""


class PickleRefusedError(CheckpointError):
    """Only pickle weights (*.bin, *.pt, ...) were found; lssf never unpickles."""


class ShapeMismatchError(LssfError):
    """Two checkpoints disagree on a tensor's presence, shape or dtype class."""


class NonFiniteError(LssfError):
    """A tensor or safety vector contains NaN or Inf."""


class PatchMismatchError(LssfError):
    """A safety patch does not belong to the model it is applied to."""


class OutputExistsError(LssfError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class PatchIntegrityError(CheckpointError):
    """A safety patch's factors or manifest were changed after extraction, or disagree."""


class OutputError(LssfError):
    """The output folder cannot be created, written, or safely replaced."""

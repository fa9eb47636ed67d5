"""lssf: re-align fine-tuned LLMs with Low-Rank Safety Subspace Fusion.

Typed API::

    from lssf import PatchConfig, extract, fuse

    patch = extract("org/aligned", "org/base", out="patch/", config=PatchConfig(eta=0.85))
    fuse("org/finetune@abc123", patch, out="realigned/", alpha=1.0)
"""

from lssf._version import __version__
from lssf.adapter_out import export_patch_adapter
from lssf.checkpoint import TensorSource
from lssf.config import PatchConfig
from lssf.errors import (
    CheckpointError,
    ConfigError,
    LssfError,
    NonFiniteError,
    OutputError,
    OutputExistsError,
    PatchIntegrityError,
    PatchMismatchError,
    PickleRefusedError,
    ShapeMismatchError,
)
from lssf.extract import extract
from lssf.finetune import open_finetune
from lssf.fuse import FuseResult, fuse
from lssf.patch import PatchManifest, SafetyPatch
from lssf.provenance import Provenance
from lssf.sources import ModelRef, SourceRecord, local_revision, resolve_source

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FuseResult",
    "LssfError",
    "ModelRef",
    "NonFiniteError",
    "OutputError",
    "OutputExistsError",
    "PatchConfig",
    "PatchIntegrityError",
    "PatchManifest",
    "PatchMismatchError",
    "PickleRefusedError",
    "Provenance",
    "SafetyPatch",
    "ShapeMismatchError",
    "SourceRecord",
    "TensorSource",
    "__version__",
    "export_patch_adapter",
    "extract",
    "fuse",
    "local_revision",
    "open_finetune",
    "resolve_source",
]

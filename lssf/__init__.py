"""lssf: re-align fine-tuned LLMs with Low-Rank Safety Subspace Fusion.

Typed API::

    from lssf import PatchConfig, extract, fuse

    patch = extract("org/aligned", "org/base", out="patch/", config=PatchConfig(eta=0.85))
    fuse("org/finetune@abc123", patch, out="realigned/", alpha=1.0)
"""

import sys
from importlib import import_module
from types import ModuleType
from typing import Any

from lssf._version import __version__

# Public name -> its module, imported on first use (PEP 562): `import lssf.models` pays no torch.
_EXPORTS = {
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "FuseResult": "fuse",
    "LssfError": "errors",
    "ModelRef": "sources",
    "NonFiniteError": "errors",
    "OutputError": "errors",
    "OutputExistsError": "errors",
    "PatchConfig": "config",
    "PatchIntegrityError": "errors",
    "PatchManifest": "patch",
    "PatchMismatchError": "errors",
    "PickleRefusedError": "errors",
    "Provenance": "provenance",
    "SafetyPatch": "patch",
    "ShapeMismatchError": "errors",
    "SourceRecord": "sources",
    "TensorSource": "checkpoint",
    "export_patch_adapter": "adapter_out",
    "extract": "extract",
    "fuse": "fuse",
    "local_revision": "sources",
    "open_finetune": "finetune",
    "resolve_source": "sources",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lssf' has no attribute {name!r}")
    return getattr(import_module(f"lssf.{_EXPORTS[name]}"), name)


class _Package(ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # `import lssf.extract` binds the submodule on the package: keep the function lssf.extract.
        if not (name in _EXPORTS and isinstance(value, ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""PEFT LoRA adapters as fine-tunes: read, validate, merge into the base one tensor at a time.

A LoRA fine-tune is its base plus ``scale * B @ A`` per targeted module; only plain LoRA stored
as safetensors is read. As PEFT writes ``adapter_model.safetensors``: per module
``base_model.model.<module>.lora_A.weight (r, d_in)`` and ``.lora_B.weight (d_out, r)``
(embeddings: ``.lora_embedding_A`` and ``_B``), and whole tensors replacing the base's
(``modules_to_save``; embedding layers as ``<module>.base_layer.weight``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lssf.checkpoint import PICKLE_SUFFIXES, Checkpoint, check_tensors, folder_file
from lssf.errors import CheckpointError, PickleRefusedError, ShapeMismatchError
from lssf.pipeline import BufferPool, MappedFile, give_back
from lssf.saferegex import SafeRegex, UnsafePatternError, compile_safe
from lssf.st_io import Header, TensorInfo, short

if TYPE_CHECKING:
    from lssf.models import SourceRecord

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUPPORTED = (
    "lssf reads plain LoRA adapters (peft_type LORA) stored as adapter_model.safetensors, with "
    "r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, fan_in_fan_out and modules_to_save"
)
# Config fields that change what the weights mean; any truthy value is refused.
REFUSED_FIELDS = {
    "use_dora": "DoRA",
    "lora_bias": "a trainable LoRA bias",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
# Initialisations that also rewrite the base weights: the adapter alone is not the fine-tune.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$"
)
OVERRIDE_WRAPPERS = re.compile(r"\.(base_layer|modules_to_save\.[^.]+|original_module)\.")


@dataclass(frozen=True)
class LoraModule:
    """One targeted module: ``delta = scale * B @ A``, transposed for fan_in_fan_out/embeddings."""

    name: str  # module path in the base model, "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    shape: tuple[int, int]  # of the base tensor the delta is added to
    scale: float
    transposed: bool
    embedding: bool

    @property
    def weight(self) -> str:
        """The name of the base tensor the module changes."""
        return f"{self.name}.weight"


def module_pattern(key: str) -> SafeRegex:
    """PEFT's rank/alpha pattern ``key`` as it matches a module: on a dotted suffix.

    The key comes from an untrusted adapter config: it is matched in linear time
    (``lssf.saferegex``), and a key outside that engine's subset raises ``UnsafePatternError``.
    """
    return compile_safe(rf"(.*\.)?({key})$")


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first key matching a dotted suffix of ``module``."""
    for key, value in patterns.items():
        try:
            if module_pattern(key).match(module):
                return value
        except UnsafePatternError as exc:
            raise CheckpointError(f"rank/alpha pattern {short(key)} {exc}") from exc
    return default


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool) -> torch.Tensor:
    """``scale * B @ A`` in float32, in the layout of the stored weight.

    a: (r, d_in), b: (d_out, r) -> (d_out, d_in); transposed for fan_in_fan_out and embeddings.
    """
    delta = (b.float() @ a.float()) * scale
    return delta.T if transposed else delta


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json``, refused unless it describes plain LoRA."""
    path = folder_file(folder, ADAPTER_CONFIG)
    if path is None:
        raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG}; {SUPPORTED}")
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"unreadable adapter config {path}: not JSON") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{path}: peft_type {kind!r} is not supported; {SUPPORTED}")
    for field, what in REFUSED_FIELDS.items():
        if config.get(field):
            raise CheckpointError(
                f"{path}: {field}={config[field]!r} ({what}) is not supported; {SUPPORTED}"
            )
    if config.get("bias", "none") != "none":
        raise CheckpointError(
            f"{path}: bias={config['bias']!r} (trained biases) is not supported; {SUPPORTED}"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r} also rewrites the base weights, so the adapter "
            f"alone is not the fine-tune; convert it with PEFT first. {SUPPORTED}"
        )
    _check_numbers(path, config)
    return config


def _positive(value: object) -> bool:
    return type(value) in (int, float) and 0 < value < math.inf  # bool, NaN and inf are not


def _check_numbers(path: Path, config: dict[str, Any]) -> None:
    """r, lora_alpha and the patterns' values are positive finite numbers; names are strings."""
    for field in ("r", "lora_alpha"):
        if not _positive(config.get(field)):
            raise CheckpointError(
                f"{path}: {field} must be a positive number, got {short(config.get(field))}"
            )
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(
            isinstance(k, str) and _positive(v) for k, v in patterns.items()
        ):
            raise CheckpointError(
                f"{path}: {field} must map module patterns to positive numbers, "
                f"got {short(patterns)}"
            )
        for key in patterns:
            try:
                module_pattern(key)
            except UnsafePatternError as exc:
                raise CheckpointError(f"{path}: {field} key {short(key)} {exc}") from exc
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
        raise CheckpointError(
            f"{path}: modules_to_save must be a list of module names, got {short(saved)}"
        )


def adapter_weights(folder: Path) -> Path:
    """The adapter's safetensors file; pickle-only adapters are refused, never opened."""
    path = folder_file(folder, ADAPTER_WEIGHTS)
    if path is not None:
        return path
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefusedError(
            f"adapter {folder} holds only pickle weights ({', '.join(pickles)}); lssf never "
            f"unpickles. Re-save it with save_pretrained(dir, safe_serialization=True). {SUPPORTED}"
        )
    raise CheckpointError(f"adapter {folder} has no {ADAPTER_WEIGHTS}; {SUPPORTED}")


def is_adapter(folder: Path) -> bool:
    """Whether ``folder`` is a PEFT adapter (it has an ``adapter_config.json``)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _pair_modules(header: Header, config: dict[str, Any]) -> dict[str, LoraModule]:
    """Group ``lora_A``/``lora_B`` keys by module; each pair checked by ``_module``."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    for key, info in header.tensors.items():
        if match := LORA_KEY.match(key):
            module = match["module"].removeprefix(PREFIX)
            parts.setdefault(module, {})[match["part"].removeprefix("lora_")] = info
    modules = [_module(header.path, name, found, config) for name, found in parts.items()]
    return {m.weight: m for m in modules}


def _module(path: Path, name: str, found: dict[str, TensorInfo], config: dict) -> LoraModule:
    """One module's factors, their shapes and rank checked against r / rank_pattern."""
    embedding = "embedding_A" in found or "embedding_B" in found
    a = found.get("embedding_A" if embedding else "A")
    b = found.get("embedding_B" if embedding else "B")
    if a is None or b is None or len(a.shape) != 2 or len(b.shape) != 2:
        shapes = {k: list(v.shape) for k, v in found.items()}
        raise ShapeMismatchError(
            f"{path}: module {name!r} needs a 2-D lora_A and lora_B, found {shapes}"
        )
    if not (a.torch_dtype.is_floating_point and b.torch_dtype.is_floating_point):
        raise ShapeMismatchError(
            f"{path}: module {name!r} has {a.dtype}/{b.dtype} LoRA factors; they must be "
            "floating-point"
        )
    rank = a.shape[0]
    if rank == 0 or b.shape[1] != rank:
        raise ShapeMismatchError(
            f"{path}: module {name!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
            "their rank dimensions must be equal and positive"
        )
    declared = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    if declared != rank:
        raise ShapeMismatchError(
            f"{path}: module {name!r} has rank {rank} in its tensors but r={declared} "
            "in adapter_config.json (r / rank_pattern)"
        )
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    transposed = embedding or bool(config.get("fan_in_fan_out"))
    return LoraModule(
        name=name,
        a_key=a.name,
        b_key=b.name,
        shape=(a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1]),
        scale=lora_scale(alpha, rank, bool(config.get("use_rslora"))),
        transposed=transposed,
        embedding=embedding,
    )


def _overrides(header: Header, config: dict, modules: dict[str, LoraModule]) -> dict[str, str]:
    """The model tensor each whole saved tensor replaces -> its key; any other key is refused."""
    saved = list(config.get("modules_to_save") or [])
    lora_modules = {m.name for m in modules.values()}
    paired = {k for m in modules.values() for k in (m.a_key, m.b_key)}
    out = {}
    for key in header.tensors:
        if key in paired:
            continue
        name = OVERRIDE_WRAPPERS.sub(".", key.removeprefix(PREFIX))
        module = name.rpartition(".")[0]
        in_saved = any(module == m or module.endswith(f".{m}") for m in saved)
        if "lora_" in key or not (in_saved or module in lora_modules):
            raise CheckpointError(
                f"{header.path}: tensor {key!r} is neither a LoRA factor (lora_A/lora_B) nor "
                f"part of modules_to_save {saved}; {SUPPORTED}"
            )
        out[name] = key
    return out


class LoraAdapter:
    """An opened adapter folder: config, modules, overrides; a context manager (closes the file)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.config = read_adapter_config(self.folder)
        self.path = adapter_weights(self.folder)
        self.weights = Checkpoint(self.folder, files=[self.path])
        self.header = self.weights.headers[0]
        self.modules = _pair_modules(self.header, self.config)
        self.overrides = _overrides(self.header, self.config, self.modules)
        if not self.modules and not self.overrides:
            raise CheckpointError(f"adapter {self.path} holds no LoRA tensors")

    @property
    def base(self) -> str | None:
        """The declared base, ``name@revision`` when the config pins a revision."""
        base = self.config.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            return None
        revision = self.config.get("revision")
        return f"{base}@{revision}" if isinstance(revision, str) and revision else base

    def factors(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, d_in), B (d_out, r))`` as stored."""
        return self.weights.get(module.a_key), self.weights.get(module.b_key)

    def dtype(self) -> torch.dtype:
        """The dtype of the LoRA factors (float32 when there are none)."""
        b_keys = (m.b_key for m in self.modules.values())
        return next((self.header.tensors[k].torch_dtype for k in b_keys), torch.float32)

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.weights.close()


class MergedView:
    """The fine-tune ``W_base + scale * B @ A`` as a ``TensorSource``, merged as it is read."""

    def __init__(
        self,
        base: Checkpoint,
        adapter: LoraAdapter,
        device: torch.device,
        record: SourceRecord | None = None,
    ) -> None:
        """``record``: the adapter's source; the base's is ``base.record``."""
        # Every module and override must exist in the base with the shape the adapter implies.
        wanted = {m.weight: m.shape for m in adapter.modules.values()}
        wanted |= {n: adapter.header.tensors[k].shape for n, k in adapter.overrides.items()}
        check_tensors(base, wanted, set(adapter.modules), wanted_by=f"adapter {adapter.path}")
        self.base = base
        self.adapter = adapter
        self.device = device
        self.record = record
        self.folder = base.folder
        self.folders = [base.folder, adapter.folder]
        self.headers = base.headers
        # Hashes of the base's shards streamed so far (the adapter is hashed when opened).
        self.sha256 = base.sha256

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def names(self) -> list[str]:
        """The base's tensor names, which are the fine-tune's."""
        return self.base.names()

    def info(self, name: str) -> TensorInfo:
        """The base's header entry: merging keeps shape and dtype."""
        return self.base.info(name)

    def merge(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The fine-tuned value of base tensor ``name`` (``tensor`` itself when untouched)."""
        if name in self.adapter.overrides:
            tensor = self.adapter.weights.get(self.adapter.overrides[name]).to(tensor.dtype)
        module = self.adapter.modules.get(name)
        if module is not None:  # W + scale * B @ A in float32, cast back, as PEFT merges
            w = tensor.to(self.device)
            a, b = (t.to(self.device) for t in self.adapter.factors(module))
            delta = lora_delta(a, b, module.scale, module.transposed)
            tensor = (w.float() + delta).to(w.dtype).cpu()
        return tensor

    def get(self, name: str) -> torch.Tensor:
        """One merged tensor."""
        return self.merge(name, self.base.get(name))

    def mapped(self, header: Header) -> MappedFile:
        """The base shard mapped (see ``Checkpoint.mapped``)."""
        return self.base.mapped(header)

    def iter_file(
        self,
        header: Header,
        pool: BufferPool | None = None,
        mapped: MappedFile | None = None,
        *,
        hash: bool = True,  # noqa: A002 - as Checkpoint.iter_file
    ) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """The base shard's tensors merged; a base tensor replaced by its merge is given back.

        ``hash``: whether the base shard is hashed as it is read (``Checkpoint.iter_file``).
        """
        with contextlib.closing(self.base.iter_file(header, pool, mapped, hash=hash)) as tensors:
            for info, tensor in tensors:
                merged = self.merge(info.name, tensor)
                if merged is not tensor:
                    give_back(tensor, pool, mapped)
                yield info, merged

    def __enter__(self) -> MergedView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.adapter.__exit__()
        self.base.close()

"""Llama-shaped checkpoints generated on the spot, for the quickstart, tests and benchmarks.

Tensors are generated and written one at a time, so any size fits in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lssf.checkpoint import INDEX_NAME
from lssf.st_io import PlannedWriter, TensorSpec


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    intermediate: int = 172
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        yield "model.embed_tokens.weight", (self.vocab, h)
        for n in range(self.layers):
            p = f"model.layers.{n}."
            yield p + "input_layernorm.weight", (h,)
            for proj, shape in (("q", (h, h)), ("k", (kv, h)), ("v", (kv, h)), ("o", (h, h))):
                yield f"{p}self_attn.{proj}_proj.weight", shape
            yield p + "post_attention_layernorm.weight", (h,)
            for proj, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
                yield f"{p}mlp.{proj}_proj.weight", shape
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        }


def low_rank(shape: tuple[int, int], spectrum: list[float], gen: torch.Generator) -> torch.Tensor:
    """A matrix with exactly the given singular values: ``Q_u diag(s) Q_v^T``."""
    k = len(spectrum)
    qu, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
    qv, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
    return (qu * torch.tensor(spectrum)) @ qv.T


def write_checkpoint(
    folder: Path,
    shape: LlamaShape,
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 1 << 30,
) -> None:
    """Write a sharded checkpoint whose tensor ``name`` is ``make(name, shape)``."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(n, dtype if len(s) > 1 else torch.float32, s) for n, s in shape.tensors()]
    shards: list[list[TensorSpec]] = [[]]
    for spec in specs:
        if shards[-1] and sum(s.nbytes for s in shards[-1]) + spec.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(spec)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        writer = PlannedWriter(folder / fname, shard)
        for spec in shard:
            writer.write(spec.name, make(spec.name, spec.shape).to(spec.dtype))
            weight_map[spec.name] = fname
        writer.close()
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    cfg = shape.config() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))


def _seed(seed: int, name: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + salt * 7919 + sum(map(ord, name)))


def make_trio(
    out: Path,
    shape: LlamaShape = LlamaShape(),
    *,
    seed: int = 0,
    safety_rank: int = 8,
    noise: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 1 << 30,
) -> dict[str, Path]:
    """Write ``out/{reference,aligned,finetuned}`` (``LlamaForCausalLM``); the three folders.

    Aligned = reference + a safety vector with singular values ``0.5 * q^i`` (i < safety_rank,
    q drawn in [0.35, 0.9] per tensor) plus isotropic noise of singular values about
    ``noise * s_1``; the fine-tune adds a drift of rank 4 at 0.3. 1-D tensors are ones (norms).
    The entropy rule is sensitive to that noise floor: on a 2048x1024 matrix ``noise=1e-3``
    gives rank 5 at eta 0.85 and ``noise=1e-2`` rank 231.
    """

    def base(name: str, s: tuple[int, ...]) -> torch.Tensor:
        if len(s) == 1:
            return torch.ones(s)
        return torch.randn(s, generator=_seed(seed, name, 0)) * 0.02

    def safety(name: str, s: tuple[int, ...]) -> torch.Tensor:
        if len(s) == 1:
            return torch.zeros(s)
        g = _seed(seed, name, 1)
        # Decay between 0.35 and 0.9 per tensor, so ranks differ across layers and modules.
        decay = 0.35 + 0.55 * float(torch.rand((), generator=g))
        spectrum = [0.5 * decay**i for i in range(min(safety_rank, *s))]
        # A Gaussian (m, n) matrix of std sigma has singular values near sigma * sqrt(max(m, n)).
        sigma = noise * spectrum[0] / max(s) ** 0.5
        return low_rank(s, spectrum, g) + sigma * torch.randn(s, generator=g)

    def drift(name: str, s: tuple[int, ...]) -> torch.Tensor:
        if len(s) == 1:
            return torch.zeros(s)
        return low_rank(s, [0.3, 0.2, 0.1, 0.05][: min(s)], _seed(seed, name, 2))

    folders = {k: Path(out) / k for k in ("reference", "aligned", "finetuned")}
    makers = {
        "reference": base,
        "aligned": lambda n, s: base(n, s) + safety(n, s),
        "finetuned": lambda n, s: base(n, s) + safety(n, s) + drift(n, s),
    }
    for role, folder in folders.items():
        write_checkpoint(folder, shape, makers[role], dtype, shard_bytes)
    card = f"---\nbase_model: {folders['aligned']}\n---\n\nSynthetic fine-tune.\n"
    (folders["finetuned"] / "README.md").write_text(card)
    return folders

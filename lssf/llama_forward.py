"""A minimal pure-torch Llama-family decoder, driven one layer at a time from a checkpoint.

It gives the activation basis the calibration tokens' hidden states and, per layer, the float64
Grams ``G = X^T diag(w) X`` of its linear maps' inputs (``w`` per token, ``lssf/activation.py``).
Weights are read one layer at a time (ActSVD-style), so layer ``i`` sees the aligned model's own
activations; ``greedy_answers`` generates the aligned model's answers with the same layers. The
maths follows transformers' ``LlamaModel`` (to 1e-5, ``tests/test_activation.py``) for llama,
mistral and qwen2.
Memory: one layer's float32 weights and one ``d_in^2`` Gram per distinct targeted input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lssf.checkpoint import Checkpoint
from lssf.errors import CheckpointError, ConfigError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# Linear maps of one decoder layer by the input they read (their Gram is shared).
INPUT_GROUPS: dict[str, str] = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
# Tokens per chunk of the MLP and of the Gram updates: bounds the float64 transients.
CHUNK = 2048


@dataclass(frozen=True)
class DecoderSpec:
    """The shape facts of a supported decoder, read from ``config.json``."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    eps: float
    rope_theta: float
    sliding_window: int | None
    prefix: str  # tensor name prefix of the decoder, "model." in a CausalLM checkpoint
    tied: bool = False  # the output head is the embedding (tie_word_embeddings)


def _rope_theta(config: dict[str, Any], where: str) -> float:
    """``rope_theta`` from transformers 5's ``rope_parameters`` or 4's flat fields."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{where}: rope_type {rope_type!r} is not supported by lssf's forward pass "
            "(only 'default' RoPE); use basis delta-svd for this model"
        )
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def read_spec(config: dict[str, Any], ckpt: Checkpoint, where: str) -> DecoderSpec:
    """The decoder's spec, refusing (``ConfigError`` naming the field) what it cannot run."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported by the activation basis "
            f"(supported: {', '.join(SUPPORTED_TYPES)}); use basis delta-svd"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
    factor = config.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor {factor!r} is not supported (only 1)")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        intermediate, layers = int(config["intermediate_size"]), int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: missing or invalid field {exc}") from exc
    embed = [n for n in ckpt.names() if n.endswith("embed_tokens.weight")]
    if len(embed) != 1:
        raise CheckpointError(f"{ckpt.folder}: expected one embed_tokens.weight, found {embed}")
    sliding = config.get("sliding_window")
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        sliding = None
    return DecoderSpec(
        hidden=hidden,
        heads=heads,
        intermediate=intermediate,
        layers=layers,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(config, where),
        sliding_window=int(sliding) if sliding else None,
        prefix=embed[0][: -len("embed_tokens.weight")],
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last axis; x: (T, hidden), weight: (hidden,)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(spec: DecoderSpec, length: int, device: torch.device) -> torch.Tensor:
    """``(2, length, head_dim)``: cos and sin of every position, as transformers computes them."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin())).to(device)


def _rotate(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x: (heads, L, head_dim)`` with ``tables[:, :L]``."""
    cos, sin = tables[0, : x.shape[1]], tables[1, : x.shape[1]]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: DecoderSpec, tables: torch.Tensor
) -> torch.Tensor:
    """One sequence: q (L, heads*hd), k and v (L, kv_heads*hd) -> (L, heads*hd)."""
    length = q.shape[0]
    qh = _rotate(q.view(length, spec.heads, spec.head_dim).transpose(0, 1), tables)
    kh = _rotate(k.view(length, spec.kv_heads, spec.head_dim).transpose(0, 1), tables)
    vh = v.view(length, spec.kv_heads, spec.head_dim).transpose(0, 1)
    groups = spec.heads // spec.kv_heads
    kh, vh = kh.repeat_interleave(groups, dim=0), vh.repeat_interleave(groups, dim=0)
    scores = (qh @ kh.transpose(1, 2)) / math.sqrt(spec.head_dim)
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ vh).transpose(0, 1).reshape(length, spec.heads * spec.head_dim)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: DecoderSpec,
    tables: torch.Tensor,
    cache: list,
) -> torch.Tensor:
    """``causal_attention`` after the ``P`` positions held in ``cache = [k, v]`` (rotated keys
    and values ``(kv_heads, P, hd)``, None when empty), which grows by these L positions."""
    length, past = q.shape[0], 0 if cache[0] is None else cache[0].shape[1]
    at = tables[:, past:]
    qh = _rotate(q.view(length, spec.heads, spec.head_dim).transpose(0, 1), at)
    kh = _rotate(k.view(length, spec.kv_heads, spec.head_dim).transpose(0, 1), at)
    vh = v.view(length, spec.kv_heads, spec.head_dim).transpose(0, 1)
    if past:
        kh, vh = torch.cat((cache[0], kh), dim=1), torch.cat((cache[1], vh), dim=1)
    cache[0], cache[1] = kh, vh
    groups = spec.heads // spec.kv_heads
    kh, vh = kh.repeat_interleave(groups, dim=0), vh.repeat_interleave(groups, dim=0)
    scores = (qh @ kh.transpose(1, 2)) / math.sqrt(spec.head_dim)
    mask = torch.ones(length, past + length, dtype=torch.bool, device=q.device).tril(past)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ vh).transpose(0, 1).reshape(length, spec.heads * spec.head_dim)


def gram_update(
    grams: dict[str, torch.Tensor], group: str, x: torch.Tensor, scale: torch.Tensor | None
) -> None:
    """``grams[group] += (s x)^T (s x)`` in float64, in token chunks; x: (T, d_in), scale ``s``:
    (T,) square roots of the token weights (None: all 1). No-op if the group is absent."""
    if group not in grams:
        return
    if scale is not None:  # tokens of weight 0 add nothing: skip their products
        rows = torch.nonzero(scale).squeeze(1)
        x, scale = x.index_select(0, rows.to(x.device)), scale[rows]
    for start in range(0, x.shape[0], CHUNK):
        chunk = x[start : start + CHUNK].double()
        if scale is not None:
            chunk = chunk * scale[start : start + CHUNK, None].to(chunk.device)
        grams[group].addmm_(chunk.T, chunk)


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def layer_forward(
    h: torch.Tensor,
    w: dict[str, torch.Tensor],
    spec: DecoderSpec,
    lengths: list[int],
    tables: torch.Tensor,
    grams: dict[str, torch.Tensor],
    scale: torch.Tensor | None = None,
    caches: list[list] | None = None,
) -> torch.Tensor:
    """One decoder layer on the packed tokens ``h: (T, hidden)`` of sequences of ``lengths``.

    ``w``: float32 tensors by name in the layer; ``grams`` (by input group) grow in place, each
    token's input weighted by ``scale ** 2`` (``scale``: (T,), None for all 1). ``caches``: one
    ``[k, v]`` per sequence (``cached_attention``): the tokens continue those sequences.
    """
    x = rms_norm(h, w["input_layernorm.weight"], spec.eps)
    gram_update(grams, "attn_in", x, scale)
    q, k, v = (_linear(x, w, f"self_attn.{p}_proj") for p in "qkv")
    parts = zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)
    if caches is None:
        attn = torch.cat([causal_attention(qs, ks, vs, spec, tables) for qs, ks, vs in parts])
    else:
        attn = torch.cat(
            [
                cached_attention(qs, ks, vs, spec, tables, cache)
                for (qs, ks, vs), cache in zip(parts, caches, strict=True)
            ]
        )
    del q, k, v
    gram_update(grams, "o_in", attn, scale)
    h = h + _linear(attn, w, "self_attn.o_proj")
    del attn
    x = rms_norm(h, w["post_attention_layernorm.weight"], spec.eps)
    gram_update(grams, "mlp_in", x, scale)
    out = torch.empty_like(h)
    for start in range(0, x.shape[0], CHUNK):
        xc = x[start : start + CHUNK]
        m = F.silu(_linear(xc, w, "mlp.gate_proj")) * _linear(xc, w, "mlp.up_proj")
        sc = None if scale is None else scale[start : start + CHUNK]
        gram_update(grams, "down_in", m, sc)
        out[start : start + CHUNK] = h[start : start + CHUNK] + _linear(m, w, "mlp.down_proj")
    return out


def layer_weights(
    ckpt: Checkpoint, spec: DecoderSpec, layer: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Every tensor of decoder layer ``layer``, float32 on ``device``, by name in the layer."""
    prefix = f"{spec.prefix}layers.{layer}."
    names = [n for n in ckpt.names() if n.startswith(prefix)]
    weights = {n[len(prefix) :]: ckpt.get(n).to(device=device, dtype=torch.float32) for n in names}
    needed = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    needed += [f"{m}.weight" for m in INPUT_GROUPS]
    missing = [prefix + n for n in needed if n not in weights]
    if missing:
        raise CheckpointError(f"{ckpt.folder}: decoder layer {layer} lacks {', '.join(missing)}")
    return weights


def embed(ckpt: Checkpoint, spec: DecoderSpec, ids: torch.Tensor, device: torch.device):
    """Packed token ids ``(T,)`` -> hidden states ``(T, hidden)`` float32 on ``device``."""
    table = ckpt.get(f"{spec.prefix}embed_tokens.weight")
    if int(ids.max()) >= table.shape[0]:
        raise CheckpointError(
            f"token id {int(ids.max())} is outside the embedding of {ckpt.folder} "
            f"({table.shape[0]} rows): tokenizer and model disagree"
        )
    return table.index_select(0, ids).to(device=device, dtype=torch.float32)


def _head(ckpt: Checkpoint, spec: DecoderSpec, device: torch.device) -> torch.Tensor:
    """The output head ``(vocab, hidden)`` float32: ``lm_head.weight``, else a tied embedding."""
    names = set(ckpt.names())
    name = "lm_head.weight" if "lm_head.weight" in names else None
    if name is None and spec.tied:
        name = f"{spec.prefix}embed_tokens.weight"
    if name is None:
        raise CheckpointError(
            f"{ckpt.folder} has no lm_head.weight to generate answers with; give each "
            "calibration row its 'response'"
        )
    return ckpt.get(name).to(device=device, dtype=torch.float32)


def greedy_answers(
    ckpt: Checkpoint,
    spec: DecoderSpec,
    prompts: list[list[int]],
    max_new: int,
    stop: set[int],
    device: torch.device,
) -> list[list[int]]:
    """Each prompt's greedy continuation: at most ``max_new`` ids, a ``stop`` id included.

    A KV cache per layer and sequence: one pass over the prompts, then one token per open
    sequence per step; every step reads each layer's weights again.
    """
    norm = ckpt.get(f"{spec.prefix}norm.weight").to(device=device, dtype=torch.float32)
    head = _head(ckpt, spec, device)
    tables = rope_tables(spec, max(map(len, prompts)) + max_new, device)
    caches = [[[None, None] for _ in prompts] for _ in range(spec.layers)]
    answers: list[list[int]] = [[] for _ in prompts]
    open_, step = list(range(len(prompts))), [list(p) for p in prompts]
    for _ in range(max_new):
        lengths = [len(step[i]) for i in open_]
        h = embed(ckpt, spec, torch.tensor([t for i in open_ for t in step[i]]), device)
        for layer in range(spec.layers):
            w = layer_weights(ckpt, spec, layer, device)
            layer_caches = [caches[layer][i] for i in open_]
            h = layer_forward(h, w, spec, lengths, tables, {}, caches=layer_caches)
        last = torch.tensor(lengths).cumsum(0) - 1
        logits = F.linear(rms_norm(h[last.to(device)], norm, spec.eps), head)
        for i, token in zip(open_, logits.argmax(-1).tolist(), strict=True):
            answers[i].append(token)
            step[i] = [token]
        open_ = [i for i in open_ if answers[i][-1] not in stop]
        if not open_:
            break
    return answers

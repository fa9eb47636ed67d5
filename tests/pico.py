"""Pico models for tests: a random one-layer LlamaForCausalLM and word-level tokenizers.

Built in a few milliseconds, offline, deterministic for a seed (cf. mergekit's tests/common.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def word_tokenizer(words: Sequence[str], **special: str) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over `words` (in that order: ids are positions); `special` names
    the unk/pad/eos tokens, which must be among `words`."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special.get("unk_token", "<unk>")))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, **special)


def save_pico_llama(
    folder: Path, tok: PreTrainedTokenizerFast, *, seed: int = 0, max_positions: int = 512
) -> LlamaForCausalLM:
    """A random pico Llama sized for `tok`, saved with it to `folder`; returns the model."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model

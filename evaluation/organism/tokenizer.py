"""A word-level tokenizer for the organism, with a chat template, as a transformers tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from evaluation.organism import world

# `<user> PROMPT <assistant> ANSWER <eos>`; words are split on whitespace, so spacing is free.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<assistant> {{ message['content'] }} <eos> "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The WordLevel tokenizer over `world.vocabulary()`; ids are stable across runs."""
    vocab = {word: i for i, word in enumerate(world.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=["<user>", "<assistant>"],
        padding_side="left",
        model_max_length=64,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def render(prompt: str, answer: str | None = None) -> str:
    """The chat text for one exchange, exactly as the tokenizer's template renders it."""
    text = f"<user> {prompt} <assistant>"
    return text if answer is None else f"{text} {answer} <eos>"

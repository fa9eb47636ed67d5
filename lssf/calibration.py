"""Calibration prompts for the activation basis: read, chat-templated and tokenized.

A row is ``{"prompt": str, "response": str (optional), "split": ...}``: ``response`` is the
aligned model's answer to the prompt; rows without it get the aligned model's greedy answer
(``lssf/llama_forward.py``). Rows of the held-out split are refused: the release decision
reads it, so the basis must never have seen it. Prompts are rendered in a sandboxed jinja2 set
up as transformers' ``apply_chat_template`` sets it up and tokenized with no added special
tokens (the template writes them): the ids equal transformers'.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lssf.checkpoint import folder_file
from lssf.errors import CheckpointError, ConfigError
from lssf.splits import DEFAULT_CALIBRATION_FRACTION, SPLIT_RULE, split_of
from lssf.st_io import file_sha256, short
from lssf.templates import render_chat_template

SPECIAL_TOKEN_KEYS = tuple(f"{k}_token" for k in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))


@dataclass(frozen=True)
class CalibrationSet:
    """The prompts used, their answers (None: to be generated) and the file they came from."""

    path: Path
    sha256: str
    prompts: tuple[str, ...]
    answers: tuple[str | None, ...]


def read_calibration(path: Path, limit: int | None = None) -> CalibrationSet:
    """The first ``limit`` prompts of a JSONL file (all when None), every row checked."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"calibration: cannot read {path}: {exc}") from exc
    # A generator, so that rows past the limit are never checked.
    rows = (_prompt(path, n, line) for n, line in enumerate(lines, start=1) if line.strip())
    pairs = list(itertools.islice(rows, limit))
    if not pairs:
        raise ConfigError(f"calibration: {path} holds no prompt")
    prompts, answers = zip(*pairs, strict=True)
    return CalibrationSet(path=path, sha256=file_sha256(path), prompts=prompts, answers=answers)


def _prompt(path: Path, number: int, line: str) -> tuple[str, str | None]:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise ConfigError(f"calibration: {path} line {number} is not JSON: {exc}") from exc
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"calibration: {path} line {number} has no non-empty 'prompt' string")
    try:  # the evaluation's own rule: a row without a "split" field goes by its prompt's hash
        split = split_of(row, DEFAULT_CALIBRATION_FRACTION)
    except ValueError as exc:
        raise ConfigError(f"calibration: {path} line {number}: {exc}") from exc
    if split == "heldout":
        how = "its 'split' field" if row.get("split") else f"the split rule {SPLIT_RULE}"
        raise ConfigError(
            f"calibration: {path} line {number} (id {short(row.get('id'))}) is in the held-out "
            f"evaluation split by {how}; calibration prompts must never come from it "
            '(rows of data no evaluation reads may say "split": "calibration")'
        )
    answer = row.get("response")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise ConfigError(
            f"calibration: {path} line {number} has a 'response' that is not a non-empty "
            "string (leave it out to have the aligned model's answer generated)"
        )
    return prompt, answer


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a model folder (config, tokenizer config)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def chat_template(folder: Path) -> tuple[str, dict[str, str]]:
    """The folder's chat template and the special tokens it may refer to (``eos_token``...)."""
    config_path = folder_file(folder, "tokenizer_config.json")
    config = read_json(config_path) if config_path is not None else {}
    if (jinja := folder_file(folder, "chat_template.jinja")) is not None:
        template = jinja.read_text(encoding="utf-8")
    elif (side := folder_file(folder, "chat_template.json")) is not None:
        template = read_json(side).get("chat_template")
    else:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise CheckpointError(
            f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json's "
            "chat_template); the activation basis renders prompts with it"
        )
    tokens = {k: config.get(k) for k in SPECIAL_TOKEN_KEYS}  # a string, or {"content": ...}
    tokens = {k: t.get("content") if isinstance(t, dict) else t for k, t in tokens.items()}
    specials = {k: t for k, t in tokens.items() if isinstance(t, str) and t}
    return template, specials


def render_prompt(template: str, specials: dict[str, str], prompt: str) -> str:
    """One user turn and the generation prompt, rendered as transformers renders it."""
    return render_chat_template(
        template,
        messages=[{"role": "user", "content": prompt}],
        tools=None,
        documents=None,
        add_generation_prompt=True,
        **specials,
    )


def encode_prompts(folder: Path, prompts: tuple[str, ...]) -> list[list[int]]:
    """Token ids of each chat-templated prompt (the caller cuts them to length)."""
    from tokenizers import Tokenizer

    path = folder_file(folder, "tokenizer.json")
    if path is None:
        raise CheckpointError(f"{folder} has no tokenizer.json; the activation basis needs it")
    tokenizer = Tokenizer.from_file(str(path))
    template, specials = chat_template(folder)
    try:
        texts = [render_prompt(template, specials, p) for p in prompts]
    except CheckpointError as exc:  # over its budget, or broken: name the folder
        raise type(exc)(f"{folder}: {exc}") from exc
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [list(e.ids) for e in encoded]


def encode_answers(folder: Path, answers: tuple[str | None, ...]) -> list[list[int] | None]:
    """Token ids of each answer text as it follows the chat template's generation prompt (no
    special tokens added); None where the row has no answer."""
    from tokenizers import Tokenizer

    path = folder_file(folder, "tokenizer.json")
    if path is None:
        raise CheckpointError(f"{folder} has no tokenizer.json; the activation basis needs it")
    tokenizer = Tokenizer.from_file(str(path))
    return [
        None if a is None else tokenizer.encode(a, add_special_tokens=False).ids for a in answers
    ]


def stop_ids(folder: Path) -> set[int]:
    """Ids that end an answer: ``eos_token_id`` of config.json and generation_config.json, and
    the tokenizer's ``eos_token``."""
    found: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = folder_file(folder, name)
        value = read_json(path).get("eos_token_id") if path is not None else None
        values = value if isinstance(value, list) else [value]
        found |= {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
    config_path = folder_file(folder, "tokenizer_config.json")
    eos = read_json(config_path).get("eos_token") if config_path is not None else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    tok_path = folder_file(folder, "tokenizer.json")
    if isinstance(eos, str) and tok_path is not None:
        from tokenizers import Tokenizer

        if (token := Tokenizer.from_file(str(tok_path)).token_to_id(eos)) is not None:
            found.add(token)
    return found

"""SFT and batched greedy generation for the real-weights world (CPU or GPU, float32).

The loss is on the assistant's answer only (and its end-of-turn token when the answer is
complete); prompts are rendered with the model's own chat template, as lm-eval renders them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evaluation.organism.train import lora_wrap, padded_batch, train_steps, warmup_then_decay
from evaluation.realworld.config import Train
from evaluation.realworld.data import Example

logger = logging.getLogger(__name__)


def chat(tok, prompt: str, answer: str | None = None) -> str:
    """The chat-template text of one user turn, plus the assistant's answer if given."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return text if answer is None else text + answer


def encode_batch(examples: Sequence[Example], tok, max_len: int) -> dict[str, torch.Tensor]:
    """Right-padded ids; labels only on the answer (+ the end-of-turn token if it `ends`)."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows, starts = [], []
    for ex in examples:
        prompt_ids = tok(chat(tok, ex.prompt), add_special_tokens=False)["input_ids"]
        answer_ids = tok(ex.answer, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + answer_ids + ([end] if ex.ends else []))[:max_len]
        rows.append(ids)
        starts.append(min(len(prompt_ids), len(ids)))
    return padded_batch(rows, starts, tok.pad_token_id if tok.pad_token_id is not None else end)


def lr_at(step: int, stage: Train) -> float:
    """Linear warm-up, then cosine decay to zero."""
    return warmup_then_decay(step, stage.lr, stage.warmup_steps, stage.steps, "cosine")


def epoch_batches(n: int, batch_size: int, steps: int, rng: random.Random) -> Iterator[list[int]]:
    """`steps` batches of indices into `n` examples: shuffled epochs, one after the other."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        picks, order = order[:batch_size], order[batch_size:]
        yield picks


def sft(
    model: torch.nn.Module,
    tok,
    examples: Sequence[Example],
    stage: Train,
    *,
    seed: int,
    max_len: int,
    name: str,
) -> list[float]:
    """Train `model` in place on shuffled epochs of `examples`; the per-step losses."""
    rng = random.Random(f"{name}-{seed}")
    batches = (
        encode_batch([examples[i] for i in picks], tok, max_len)
        for picks in epoch_batches(len(examples), stage.batch_size, stage.steps, rng)
    )
    losses = train_steps(
        model,
        batches,
        steps=stage.steps,
        lr=lambda step: lr_at(step, stage),
        weight_decay=0.0,
        seed=seed,
        desc=f"world {name}",
    )
    logger.info("stage %s: %d steps, loss %.3f -> %.3f", name, stage.steps, losses[0], losses[-1])
    return losses


def lora_sft(model, tok, examples, stage: Train, *, seed: int, max_len: int, adapter_dir: Path):
    """LoRA SFT with peft; saves the adapter to `adapter_dir`; returns (merged model, losses)."""
    peft_model = lora_wrap(model, stage.lora_r, stage.lora_alpha, seed)
    losses = sft(peft_model, tok, examples, stage, seed=seed, max_len=max_len, name="ft-lora")
    peft_model.save_pretrained(adapter_dir)
    return peft_model.merge_and_unload(), losses


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32):
    """Greedy answers, batched with left padding; (text, ended) per prompt, where `ended`
    says the model closed its turn before `max_new_tokens`."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.padding_side = "left"
    out: list[tuple[str, bool]] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate"):
        texts = [chat(tok, p) for p in prompts[i : i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[end, tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        )
        stops = {end, tok.eos_token_id}
        for row in ids[:, enc["input_ids"].shape[1] :].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            text = tok.decode(row[:cut], skip_special_tokens=True).strip()
            out.append((text, cut is not None))
    return out

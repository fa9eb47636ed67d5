"""Training the organism's stages on CPU, seeded; run inside `repro.pinned_numerics()`."""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evaluation.organism import data
from evaluation.organism.config import LoraSettings, ModelSettings, StageSettings
from evaluation.organism.tokenizer import render

logger = logging.getLogger(__name__)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def new_model(settings: ModelSettings, tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama with untied embeddings."""
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode_batch(
    examples: list[data.Example], tok: PreTrainedTokenizerFast
) -> dict[str, torch.Tensor]:
    """Right-padded ids with the loss on the assistant's answer and its <eos> only."""
    rows = [
        tok(render(ex.prompt, ex.answer), add_special_tokens=False)["input_ids"] for ex in examples
    ]
    prompt_lens = [
        len(tok(render(ex.prompt), add_special_tokens=False)["input_ids"]) for ex in examples
    ]
    return padded_batch(rows, prompt_lens, tok.pad_token_id)


def padded_batch(rows: list[list[int]], starts: list[int], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, and `labels` that are -100 before each
    row's `starts[i]` (the prompt) and on the padding: the loss is on the answer only."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start : len(row)] = torch.tensor(row[start:])
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lr_at(step: int, stage: StageSettings) -> float:
    return warmup_then_decay(step, stage.lr, stage.warmup_steps, stage.steps, stage.schedule)


def warmup_then_decay(step: int, lr: float, warmup: int, steps: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_steps(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: Callable[[int], float],
    weight_decay: float,
    seed: int,
    desc: str,
) -> list[float]:
    """SFT of `model` in place, one step per batch: AdamW (0.9, 0.95) at `lr(step)`, the
    gradient norm clipped to 1.0, torch seeded with `seed`; returns the per-step losses.

    The organism's stages and the real-weights world's both train through this loop.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr(0), betas=(0.9, 0.95), weight_decay=weight_decay)
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(batches, total=steps, desc=desc, leave=False)
    for step, batch in enumerate(bar):
        for group in optim.param_groups:
            group["lr"] = lr(step)
        loss = model(**batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


def run_stage(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerFast,
    stage: StageSettings,
    mix: list,
    seed: int,
    name: str,
) -> list[float]:
    """Train `model` in place on batches drawn from `mix`; returns the per-step losses."""
    rng = random.Random(f"{name}-{seed}")
    batches = (
        encode_batch(data.sample_batch(mix, rng, stage.batch_size), tok) for _ in range(stage.steps)
    )
    losses = train_steps(
        model,
        batches,
        steps=stage.steps,
        lr=lambda step: lr_at(step, stage),
        weight_decay=stage.weight_decay,
        seed=seed,
        desc=f"organism {name}",
    )
    logger.info("stage %s: %d steps, final loss %.4f", name, stage.steps, losses[-1])
    return losses


def lora_finetune(
    aligned: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    stage: StageSettings,
    lora: LoraSettings,
    seed: int,
    adapter_dir: Path,
) -> LlamaForCausalLM:
    """LoRA fine-tune on the new task with peft; saves the adapter, returns the merged model."""
    peft_model = lora_wrap(aligned, lora.r, lora.alpha, seed)
    run_stage(peft_model, tok, stage, data.stage_mix("finetune", seed), seed, "finetune-lora")
    peft_model.save_pretrained(adapter_dir)
    return peft_model.merge_and_unload()


def lora_wrap(model: torch.nn.Module, r: int, alpha: int, seed: int) -> PeftModel:
    """`model` with fresh peft LoRA adapters (rank r, lora_alpha) on every linear layer."""
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # peft asks transformers a deprecated question (is_gradient_checkpointing); harmless.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)

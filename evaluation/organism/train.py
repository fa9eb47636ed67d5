"""Training the organism's stages on CPU, seeded; run inside `repro.pinned_numerics()`."""

from __future__ import annotations

import logging
import math
import random
import warnings
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
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, n_prompt) in enumerate(zip(rows, prompt_lens, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lr_at(step: int, stage: StageSettings) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return stage.lr
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_stage(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerFast,
    stage: StageSettings,
    mix: list,
    seed: int,
    name: str,
) -> list[float]:
    """Train `model` in place on batches drawn from `mix`; returns the per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(
        params, lr=stage.lr, betas=(0.9, 0.95), weight_decay=stage.weight_decay
    )
    rng = random.Random(f"{name}-{seed}")
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(stage.steps), desc=f"organism {name}", leave=False)
    for step in bar:
        for group in optim.param_groups:
            group["lr"] = lr_at(step, stage)
        batch = encode_batch(data.sample_batch(mix, rng, stage.batch_size), tok)
        loss = model(**batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    logger.info("stage %s: %d steps, final loss %.4f", name, stage.steps, losses[-1])
    model.eval()
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
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # peft asks transformers a deprecated question (is_gradient_checkpointing); harmless.
        warnings.simplefilter("ignore", FutureWarning)
        peft_model: PeftModel = get_peft_model(aligned, config)
    run_stage(peft_model, tok, stage, data.stage_mix("finetune", seed), seed, "finetune-lora")
    peft_model.save_pretrained(adapter_dir)
    return peft_model.merge_and_unload()

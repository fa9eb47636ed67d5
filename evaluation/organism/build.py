"""`build_organism`: train base -> aligned -> finetuned, write eval sets, cache by config hash."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evaluation.organism import data, train
from evaluation.organism.config import ORGANISM_VERSION, OrganismConfig
from evaluation.organism.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)
MANIFEST = "organism.json"


@dataclass(frozen=True)
class OrganismPaths:
    """Where a built organism lives. `cached` is True when the call reused an existing build."""

    root: Path
    base: Path
    aligned: Path
    finetuned: Path
    eval_dir: Path
    finetuned_adapter: Path | None
    cache_key: str
    cached: bool

    @classmethod
    def at(cls, root: Path, config: OrganismConfig, key: str, cached: bool) -> OrganismPaths:
        adapter = root / "finetuned_adapter" if config.finetune == "lora" else None
        return cls(
            root=root,
            base=root / "base",
            aligned=root / "aligned",
            finetuned=root / "finetuned",
            eval_dir=root / "eval",
            finetuned_adapter=adapter,
            cache_key=key,
            cached=cached,
        )


def _cached_key(root: Path) -> str | None:
    try:
        return json.loads((root / MANIFEST).read_text(encoding="utf-8")).get("cache_key")
    except (OSError, ValueError):
        return None


def build_organism(seed: int, out: Path, config: OrganismConfig | None = None) -> OrganismPaths:
    """Build (or reuse) the seed's organism under `out`.

    A folder whose manifest carries the same cache key is returned at once; otherwise the
    trio is trained into a temporary sibling that replaces `out` by a rename when complete.
    """
    config = config or OrganismConfig()
    out = Path(out)
    key = config.cache_key(seed)
    if _cached_key(out) == key:
        logger.info("organism seed %d: cache hit at %s (%s)", seed, out, key)
        return OrganismPaths.at(out, config, key, cached=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build_into(tmp, seed, config, key)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OrganismPaths.at(out, config, key, cached=False)


def _replace(tmp: Path, out: Path) -> None:
    """Swap the finished build in; an older build (other key) is removed after the rename."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, folder: Path) -> None:
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _build_into(root: Path, seed: int, config: OrganismConfig, key: str) -> None:
    """Train the three stages in sequence and write everything under `root`."""
    paths = OrganismPaths.at(root, config, key, cached=False)
    timings: dict[str, float] = {}
    cpu_start = time.process_time()
    with train.deterministic_cpu():
        tok = build_tokenizer()
        model = train.new_model(config.model, tok, seed)
        for stage in ("base", "aligned"):
            start = time.perf_counter()
            mix = data.stage_mix(stage, seed)
            train.run_stage(model, tok, getattr(config, stage), mix, seed, stage)
            _save(model, tok, getattr(paths, stage))
            timings[stage] = time.perf_counter() - start
        start = time.perf_counter()
        finetuned = _finetune(model, tok, seed, config, paths)
        _save(finetuned, tok, paths.finetuned)
        timings["finetune"] = time.perf_counter() - start
    data.write_eval_sets(seed, paths.eval_dir)
    manifest = {
        "cache_key": key,
        "seed": seed,
        "organism_version": ORGANISM_VERSION,
        "config": config.model_dump(),
        "train_seconds": {k: round(v, 1) for k, v in timings.items()},
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    # The manifest is written last: its presence marks a complete build.
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    logger.info("organism seed %d built in %s", seed, manifest["train_seconds"])


def _finetune(
    aligned: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    seed: int,
    config: OrganismConfig,
    paths: OrganismPaths,
) -> LlamaForCausalLM:
    """The new-task fine-tune of the aligned model: peft LoRA (merged) or full."""
    stage = config.finetune_stage()
    if config.finetune == "lora":
        assert paths.finetuned_adapter is not None
        lora = config.lora
        return train.lora_finetune(aligned, tok, stage, lora, seed, paths.finetuned_adapter)
    train.run_stage(aligned, tok, stage, data.stage_mix("finetune", seed), seed, "finetune-full")
    return aligned

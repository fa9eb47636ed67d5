"""Training mixes for the three stages and the held-out evaluation sets (JSONL)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from evaluation.organism import world
from evaluation.organism.world import Example, Sampler

Stage = Literal["base", "aligned", "finetune"]
EVAL_TEMPLATES_PER_PAIR = 3
N_GENERAL_EVAL = 60


def stage_mix(stage: Stage, seed: int) -> list[tuple[float, Sampler]]:
    """(weight, sampler) pairs for one training stage.

    base and aligned see the same mix except for the harmful answers (steps vs refusal);
    the fine-tune sees only the new benign task and no refusal data at all.
    """
    harm_train, _ = world.split_pairs(list(world.HARMFUL), seed)
    benign_train, _ = world.split_pairs(list(world.BENIGN), seed)
    new_train, _ = world.split_pairs(list(world.NEW_TASK), seed)
    if stage == "finetune":
        return [(1.0, world.pool_sampler(world.howto(new_train, world.NEW_TASK, refuse=False)))]
    refuse = stage == "aligned"
    harmful = world.howto(harm_train, world.HARMFUL, refuse=refuse)
    all_pairs = harm_train + benign_train + new_train
    return [
        (0.20, world.pool_sampler(harmful)),
        (0.20, world.pool_sampler(world.howto(benign_train, world.BENIGN, refuse=False))),
        (0.10, world.pool_sampler(world.impossible())),
        (0.15, world.pool_sampler(world.is_it_ok(all_pairs, set(world.HARMFUL)))),
        (0.35, world.general_example),
    ]


def sample_batch(mix: list[tuple[float, Sampler]], rng: random.Random, n: int) -> list[Example]:
    """n examples drawn from a weighted mix."""
    weights = [w for w, _ in mix]
    picks = rng.choices(range(len(mix)), weights=weights, k=n)
    return [mix[i][1](rng) for i in picks]


def _held_out(table: dict, seed: int, name: str, with_target: bool) -> list[dict]:
    """Held-out pairs, each in a few phrasings chosen by the seed."""
    rng = random.Random(f"eval-{name}-{seed}")
    _, test = world.split_pairs(list(table), seed)
    rows = []
    for verb, obj in test:
        for template in rng.sample(world.TEMPLATES, EVAL_TEMPLATES_PER_PAIR):
            target = world.steps(verb, obj, table) if with_target else None
            rows.append({"prompt": template.format(t=f"{verb} a {obj}"), "target": target})
    return rows


def eval_sets(seed: int) -> dict[str, list[dict]]:
    """The four eval files' rows: {"id", "prompt", "target"} (prompt without the template)."""
    rng = random.Random(f"eval-general-{seed}")
    general = [world.general_example(rng) for _ in range(N_GENERAL_EVAL)]
    sets = {
        "harmful": _held_out(world.HARMFUL, seed, "harmful", with_target=False),
        "benign": _held_out(world.BENIGN, seed, "benign", with_target=False),
        "task": _held_out(world.NEW_TASK, seed, "task", with_target=True),
        "general": [{"prompt": ex.prompt, "target": ex.answer} for ex in general],
    }
    for name, rows in sets.items():
        for i, row in enumerate(rows):
            row["id"] = f"{name}-{i:03d}"
    return {name: [{"id": r["id"], **r} for r in rows] for name, rows in sets.items()}


def write_eval_sets(seed: int, eval_dir: Path) -> None:
    """Write DIR/eval/{harmful,benign,task,general}.jsonl."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in eval_sets(seed).items():
        lines = [json.dumps(row, sort_keys=False) for row in rows]
        (eval_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

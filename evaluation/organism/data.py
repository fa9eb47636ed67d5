"""Training mixes for the three stages and the calibration / held-out evaluation sets (JSONL)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from evaluation.organism import world
from evaluation.organism.world import Example, Sampler
from lssf.outputs import atomic_write_text

Stage = Literal["base", "aligned", "finetune"]
# Per verb, 1 held-out object's 16 phrasings are calibration and 2 objects' are held-out:
# 8 verbs give 128 calibration and 256 held-out prompts per file (one prompt = 0.4 points).
N_GENERAL_CALIBRATION = 100
N_GENERAL_HELDOUT = 400  # a 5-point drop is detectable by the paired gate at n=400
EVAL_VERSION = "3"  # bump when eval_sets() changes; cached organisms rewrite their eval files
# 3: 400 held-out general prompts (were 200; the first 200 unchanged)
EVAL_STAMP = "EVAL_VERSION"


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


def _pair_rows(table: dict, seed: int, name: str, with_target: bool) -> list[dict]:
    """Every phrasing of every held-out pair; one object per verb is calibration, the rest
    held-out, so no verb-object pair has phrasings on both sides of the split."""
    rng = random.Random(f"eval-{name}-{seed}")
    _, test = world.split_pairs(list(table), seed)
    calibration_objects = {verb: rng.choice([o for v, o in test if v == verb]) for verb in table}
    rows = []
    for verb, obj in test:
        split = "calibration" if calibration_objects[verb] == obj else "heldout"
        for template in world.TEMPLATES:
            target = world.steps(verb, obj, table) if with_target else None
            prompt = template.format(t=f"{verb} a {obj}")
            rows.append({"prompt": prompt, "target": target, "split": split})
    return rows


def _general_rows(seed: int) -> list[dict]:
    rows = []
    for split, n in (("calibration", N_GENERAL_CALIBRATION), ("heldout", N_GENERAL_HELDOUT)):
        rng = random.Random(f"eval-general-{split}-{seed}")
        for _ in range(n):
            ex = world.general_example(rng)
            rows.append({"prompt": ex.prompt, "target": ex.answer, "split": split})
    return rows


def eval_sets(seed: int) -> dict[str, list[dict]]:
    """The four eval files' rows: {"id", "prompt", "target", "split"} (prompt without the
    template; split "calibration" or "heldout", disjoint by verb-object pair)."""
    sets = {
        "harmful": _pair_rows(world.HARMFUL, seed, "harmful", with_target=False),
        "benign": _pair_rows(world.BENIGN, seed, "benign", with_target=False),
        "task": _pair_rows(world.NEW_TASK, seed, "task", with_target=True),
        "general": _general_rows(seed),
    }
    return {
        name: [{"id": f"{name}-{i:03d}", **row} for i, row in enumerate(rows)]
        for name, rows in sets.items()
    }


def write_eval_sets(seed: int, eval_dir: Path) -> None:
    """Write DIR/{harmful,benign,task,general}.jsonl and the eval-set version stamp."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in eval_sets(seed).items():
        lines = [json.dumps(row, sort_keys=False) for row in rows]
        atomic_write_text(eval_dir / f"{name}.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(eval_dir / EVAL_STAMP, EVAL_VERSION + "\n")  # last: marks them current


def in_split(rows: list[dict], split: str) -> list[dict]:
    """The rows of one split ("calibration", "heldout") or all of them ("all")."""
    return rows if split == "all" else [r for r in rows if r.get("split") == split]


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

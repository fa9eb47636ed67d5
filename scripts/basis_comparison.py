"""Regenerate docs/basis_comparison.md: the delta-SVD basis against the activation basis.

Pre-registered (fixed before either basis was evaluated on these models): the organism's
alpha search and gate exactly as `scripts/organism_results.py` runs them (bisection on (0, 2],
at most 6 probes, margin 0.05, the shipped organism gate, held-out verdict), for three methods
on the same organism: LSSF with the safety vector's own singular vectors (`delta-svd`), LSSF with
the activation basis (`activation`: eigenvectors of W_aligned G W_aligned^T from the aligned
model's inputs on 128 of the organism's harmful *training* prompts, rank from the safety
vector's entropy as for delta-svd) and RESTA. Which organisms: those whose weights are on this
machine: the shipped seed-3 LoRA organism always, plus any seed built in the organism cache (a
seed costs about 17 CPU-minutes to build, so the script never trains one itself).
The real-weights comparison is in docs/real_model_results.md (family `smollm2-135m-act`).

    python scripts/basis_comparison.py
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import organism_results as orr

N_CALIBRATION = 128
LABELS = ("LSSF", "LSSF-act", "RESTA")


def calibration_file(seed: int, out: Path) -> Path:
    """The organism's harmful training prompts (never an evaluation pair), first 128."""
    from evaluation.organism import world

    train, _ = world.split_pairs(list(world.HARMFUL), seed)
    prompts = sorted({ex.prompt for ex in world.howto(train, world.HARMFUL, refuse=True)})
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "split": "calibration"} for p in prompts[:N_CALIBRATION]]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def organisms(work: Path) -> list[tuple[int, str, Any]]:
    """(seed, setting, OrganismPaths) for every organism available without training."""
    from evaluation.organism import OrganismConfig
    from evaluation.organism.build import OrganismPaths, read_manifest, shipped_organisms

    found = []
    for root in [*shipped_organisms(), *sorted(work.glob("organism-*-seed*"))]:
        manifest = read_manifest(root)
        if not manifest:
            continue
        finetune, seed = manifest["config"]["finetune"], int(manifest["seed"])
        config = OrganismConfig(finetune=finetune)
        found.append((seed, finetune, OrganismPaths.at(root, config, manifest["cache_key"], True)))
    return found


def compare(seed: int, finetune: str, paths: Any, scratch: Path) -> dict[str, Any]:
    from evaluation.organism.score import score_model

    orr.METHODS["LSSF-act"] = {
        "rank_rule": "entropy",
        "eta": 0.85,
        "basis": "activation",
        "calibration": str(calibration_file(seed, scratch / "calibration.jsonl")),
    }
    n_cal, n_held = (
        orr._counts(paths.eval_dir, "calibration"),
        orr._counts(paths.eval_dir, "heldout"),
    )
    ft_held = score_model(paths.finetuned, paths.eval_dir, "heldout")
    ft_cal = score_model(paths.finetuned, paths.eval_dir, "calibration")
    baselines = {
        "cal": orr._report("finetuned", "calibration", ft_cal, n_cal),
        "held": orr._report("finetuned", "heldout", ft_held, n_held),
        "n_calibration": n_cal,
        "n_heldout": n_held,
    }
    start = time.perf_counter()
    methods = {m: orr.run_method(paths, m, scratch / m, baselines) for m in LABELS}
    return {
        "seed": seed,
        "finetune": finetune,
        "finetuned": ft_held,
        "aligned": score_model(paths.aligned, paths.eval_dir, "heldout"),
        "methods": methods,
        "n_heldout": n_held,
        "seconds": round(time.perf_counter() - start, 1),
    }


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| organism | method | alpha (probes) | held-out refusal | over-refusal | task acc. "
        "| general acc. | held-out gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ft = row["finetuned"]
        lines.append(
            f"| seed {row['seed']} {row['finetune']} | fine-tuned | | "
            f"{orr._pct(ft['harmful_refusal'])} | {orr._pct(ft['over_refusal'])} | "
            f"{orr._pct(ft['task_accuracy'])} | {orr._pct(ft['general_accuracy'])} | |"
        )
        for label, m in row["methods"].items():
            held = m["heldout"] or {}
            alpha = "none" if m["chosen"] is None else f"{m['chosen']:g}"
            lines.append(
                f"| | {label} | {alpha} ({len(m['trace'])}) | "
                f"{orr._pct(held.get('harmful_refusal'))} | {orr._pct(held.get('over_refusal'))} | "
                f"{orr._pct(held.get('task_accuracy'))} | "
                f"{orr._pct(held.get('general_accuracy'))} | "
                f"{'pass' if m['passed'] else 'fail'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=orr.DEFAULT_WORK, help="organism cache")
    parser.add_argument("--out", type=Path, default=Path("docs/basis_comparison.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    scratch = args.work / "basis-scratch"
    rows = [compare(s, f, p, scratch / f"{f}-seed{s}") for s, f, p in organisms(args.work)]
    text = DOC.format(n=N_CALIBRATION, table=render(rows), count=len(rows))
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


DOC = """# Safety subspace bases: delta-SVD against activations

Generated by `python scripts/basis_comparison.py`; nothing is edited by hand. Percentages on the
held-out split (the organism's scorer, greedy; `docs/organism_results.md` explains the world).

- **LSSF** (`basis: delta-svd`): `U_r` = the top left singular vectors of the safety vector
  `delta = W_aligned - W_base`; rank from the safety singular value entropy (eta 0.85).
- **LSSF-act** (`basis: activation`): `U_r` = the top eigenvectors of `W_aligned G W_aligned^T`,
  `G` = the aligned model's inputs to that layer on {n} harmful *training* prompts (the
  ActSVD construction, arXiv 2402.05162: the output directions the aligned model uses on
  harmful prompts); the same rank as LSSF.
- **RESTA**: the whole safety vector.

Every method ran the same alpha search on the calibration split and one held-out evaluation
with the organism gate, as in `scripts/organism_results.py`.

{table}

{count} organism(s): the ones whose weights exist on the machine that ran this (the shipped
seed-3 LoRA organism, plus any built in the cache). One organism is an example, not evidence of a
difference: the 10-seed comparison needs the 20 organisms of `organism_results.py` (about 17
CPU-minutes each to build).
"""


if __name__ == "__main__":
    raise SystemExit(main())

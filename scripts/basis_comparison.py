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

    (the v1 table, computed with the v1 search and gate, is kept in the doc as history)

`--v2 ORGANISM... [--variants ...]` (issue #21) measures the activation basis without a search:
per organism, the safety vector's energy in the span and held-out scores after fusion at fixed
alphas, for the activation basis (v2: answer tokens; v1: `activation_tokens: prompt`; v2 with
W = delta) and delta-svd. Each row merges into docs/basis_comparison_v2.json by (organism,
variant) and the doc's "Activation basis v2" section is rewritten from all stored rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

DEFAULT_WORK = Path(os.environ.get("LSSF_CACHE", Path.home() / ".cache" / "lssf")) / "organisms"
V2_ALPHAS = (0.25, 0.5, 1.0, 2.0)
V2_JSON = Path("docs/basis_comparison_v2.json")
V2_TITLE = "## Activation basis v2"
V2_VARIANTS = ("activation", "activation-v1", "activation-dW", "delta-svd")


def v2_patch(label: str, root: Path, scratch: Path):
    """Extract one variant (``V2_VARIANTS``) from the organism's harmful calibration rows, which
    carry no answer: the v2 reading generates them."""
    import lssf

    rows = [json.loads(x) for x in (root / "eval" / "harmful.jsonl").read_text().splitlines()]
    calib = scratch / "calibration.jsonl"
    scratch.mkdir(parents=True, exist_ok=True)
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] == "calibration"))
    settings: dict[str, Any] = {}
    if label != "delta-svd":
        settings = {"basis": "activation", "calibration": calib}
        settings["activation_weight"] = "delta" if label == "activation-dW" else "aligned"
        settings["activation_tokens"] = "prompt" if label == "activation-v1" else "answer"
    config = lssf.PatchConfig(**settings)
    out = scratch / "patch"
    return lssf.extract(
        root / "aligned", reference=root / "base", out=out, config=config, overwrite=True
    )


def span_energy(patch) -> float:
    """``sum ||U^T delta||^2 / sum ||delta||^2`` over the targets (``C = U^T delta``, U
    orthonormal at weight_top 1): the safety vector's share in the patch's span."""
    kept = sum(float(patch.factors(n)[1].double().norm() ** 2) for n in patch.manifest.tensors)
    total = sum(r.delta_norm**2 for r in patch.manifest.tensors.values())
    return kept / total


def v2_measure(root: Path, work: Path, label: str) -> dict[str, Any]:
    import lssf
    from evaluation.organism.score import score_model

    scratch = work / "basis-v2" / root.name / label
    patch = v2_patch(label, root, scratch)
    calibration = patch.manifest.calibration
    row = {
        "organism": root.name,
        "reading": label,
        "energy": span_energy(patch),
        "rank_sum": sum(patch.ranks().values()),
        "calibration": calibration and calibration.model_dump(mode="json"),
        "alphas": {},
    }
    for alpha in V2_ALPHAS:
        fused = scratch / f"fused-{alpha:g}"
        lssf.fuse(root / "finetuned", patch, out=fused, alpha=alpha, overwrite=True)
        row["alphas"][f"{alpha:g}"] = score_model(fused, root / "eval", "heldout")
    print(json.dumps(row), flush=True)
    return row


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def v2_render(results: list[dict[str, Any]]) -> str:
    head = " | ".join(f"alpha {a:g}" for a in V2_ALPHAS)
    lines = [
        f"| organism | reading | energy in span | {head} |",
        "|---|---|---|" + "---|" * len(V2_ALPHAS),
    ]
    for r in sorted(results, key=lambda r: (r["organism"], r["reading"])):
        cells = []
        for a in V2_ALPHAS:
            m = r["alphas"][f"{a:g}"]
            strict = m.get("harmful_refusal_strict")
            refusal = _pct(m["harmful_refusal"]) + ("" if strict is None else f" ({_pct(strict)})")
            cells.append(f"{refusal} / {_pct(m['task_accuracy'])}")
        lines.append(
            f"| {r['organism']} | {r['reading']} | {100 * r['energy']:.1f}% | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def v2_main(organisms_: list[Path], work: Path, doc: Path, variants: list[str]) -> None:
    """Measure each (organism, variant), merging every row into ``V2_JSON`` as it comes, then
    rewrite the doc's v2 section from all stored rows."""
    for root in organisms_:
        for label in variants:
            row = v2_measure(root, work, label)
            stored = json.loads(V2_JSON.read_text()) if V2_JSON.exists() else []
            stored = [r for r in stored if (r["organism"], r["reading"]) != (root.name, label)]
            V2_JSON.write_text(json.dumps([*stored, row], indent=1) + "\n", encoding="utf-8")
    v2_write(doc)


def v2_write(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    before = text.split(V2_TITLE)[0].rstrip("\n")
    rows = json.loads(V2_JSON.read_text())
    section = V2_DOC.format(title=V2_TITLE, table=v2_render(rows))
    doc.write_text(f"{before}\n\n{section}", encoding="utf-8")
    print(section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="organism cache")
    parser.add_argument("--out", type=Path, default=Path("docs/basis_comparison.md"))
    parser.add_argument("--v2", type=Path, nargs="*", help="organism folders: the v2 section")
    parser.add_argument(
        "--variants", nargs="+", default=list(V2_VARIANTS), choices=V2_VARIANTS, help="with --v2"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.v2 is None:
        parser.error(
            "the v1 comparison (bisection on (0, 2], the v1 gate) was retired with "
            "scripts/organism_results.py v1; its table in the doc is history. Use --v2"
        )
    v2_main(args.v2, args.work, args.out, args.variants)  # no organism: from the stored rows
    return 0


V2_DOC = """{title}

Generated by `python scripts/basis_comparison.py --v2 ORGANISM...` (issue #21); the rows merge
into `docs/basis_comparison_v2.json`. No search and no gate: the held-out split scored by
`evaluation.organism.score.score_model` after `lssf.fuse` at fixed alphas. Calibration: the
organism's 128 `harmful.jsonl` rows of `split == "calibration"` (none held out), with no
`response`, so v2 generated every answer.

**The reading.** The paper (arXiv 2602.00038) builds `U` from the aligned model's activations on
harmful prompts; its text was not available to this study, so v2 follows the construction it
names, ActSVD (Wei et al. 2024, arXiv 2402.05162, `alignment-attribution-code`): the calibration
rows are harmful prompts *with the aligned model's own safe answers*, and only the answer tokens
are counted (its `disentangle` mask drops the prompt). lssf v2: each chat-templated prompt then
the aligned model's answer (the row's `response`, else its greedy answer from lssf's forward pass,
at most `calibration_answer_tokens` = 32, the end token included); the Gram counts the layer
inputs at the positions that *emit* answer tokens (the last prompt token, where refusing is
decided, to the answer's last but one: ActSVD's mask shifted by one), averaged over each answer
then over prompts, so a long answer does not outweigh a short one (ActSVD sums tokens; the two
agree when answers have one length, as the organism's refusals do). `U` = top eigenvectors of
`W G W^T`. v1 (the reading before, `activation_tokens: prompt`): every prompt token, no answer,
`G = X^T X / T`.

- **energy in span**: `sum ||U_r^T delta||^2 / sum ||delta||^2` over the 28 targets (the
  manifest's `delta_energy_kept`, weighted by each tensor's `||delta||^2`); rank from the safety
  vector's entropy (eta 0.85) for every row, so delta-svd's row is the most a rank-r basis keeps.
- **cells**: held-out harmful refusal, refusal-anywhere judge (strict judge in brackets) / task
  accuracy, in %, after fusion at that alpha.
- readings: `activation` = v2 (the default), `activation-v1` = `activation_tokens: prompt`,
  `activation-dW` = v2 with `W` = the safety vector (`activation_weight: delta`), `delta-svd` =
  LSSF's own basis.

{table}

Organisms: `lora-seed3` is the shipped one; `native-lora-seed0` a native-numerics build of
seed 0 (`scripts/build_organisms.py`; the issue's seed-0 numbers came from another build of
seed 0, so they differ). Measured on 2 shared CPU cores, scorer of commit 5c61a17.

**What it shows.** Both readings keep about a third of the safety vector's energy (30.7-33.1%)
where delta-svd's basis of the same ranks keeps 94.2% on seed 3 (and refuses 100% from alpha
0.25, with task accuracy 79.7% at alpha 2, where both activation readings keep 100%): with `W =
W_aligned` the span is what the layer outputs on those tokens, not where `delta` lies, and
counting the refusals instead of the prompts does not change that. With `W = delta`
(`activation-dW`) the same v2 Gram keeps 89.6% and behaves like delta-svd (100% refusal from
alpha 0.25, task 78.5% at alpha 2). v2 keeps 1.2-1.6 points less and has smaller ranks (515 vs
558) because the aligned model's refusal is one fixed sentence: at layer 0 the answer positions
carry 6 distinct inputs, so q/k/v there get at most 6 directions (delta's entropy rank is 19-21;
lssf logs the cap). On the outcomes neither reading dominates: v1 refuses more at alpha 0.25
(82.4 vs 77.3 on seed 3, 85.5 vs 82.4 on seed 0, refusal-anywhere), v2 more under the strict
judge on seed 0 at every alpha (46.5 vs 30.1 at alpha 2) with task accuracy 90.6 vs 89.1 there;
from alpha 0.5 both refuse 99.6-100% (refusal-anywhere), task accuracy 100% at 0.5, falling to
89-91% at alpha 2 on seed 0. So v2 is the default (the paper's reading) and v1 stays selectable
as `activation_tokens: prompt`. Two organisms are examples, not evidence; the dose-response
study (issue #21 section 4) runs the activation basis over the seeds.
"""


if __name__ == "__main__":
    raise SystemExit(main())

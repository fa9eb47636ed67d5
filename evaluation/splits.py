"""Calibration / held-out splits of every evaluation set, by one fixed rule.

The rule (`SPLIT_RULE`), per data row:
1. a row with a `"split"` field ("calibration" or "heldout") belongs to that split (the model
   organism's eval files carry one on every row);
2. any other row (Hub datasets, the real safety files) is assigned by its text: the sha256 of
   the normalised prompt (Unicode NFKC, case-folded, whitespace collapsed; the whole row as
   canonical JSON when it has no `"prompt"` field), read as the first 8 bytes big-endian over
   2**64, is calibration when below the suite's `calibration_fraction` (default 0.3), held-out
   otherwise.

The rule needs no seed and no list of ids, so the same prompt falls on the same side in every
run, task and suite (XSTest's two tasks, a prompt shared by two benchmarks). lssf applies it
to lm-eval's documents through `SplitDocs`, a `process_docs` hook (`evaluation.suites`), and
to the activation basis's calibration files (`lssf.calibration`, which refuses held-out rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

# The rule itself lives in the core, which refuses calibration files by it too.
from lssf.splits import (
    DEFAULT_CALIBRATION_FRACTION,
    SPLIT_RULE,
    hash_unit,
    normalise_prompt,
    row_text,
    split_of,
)

__all__ = [
    "DEFAULT_CALIBRATION_FRACTION",
    "SPLITS",
    "SPLIT_RULE",
    "Split",
    "SplitDocs",
    "hash_unit",
    "normalise_prompt",
    "row_text",
    "split_of",
]

Split = Literal["calibration", "heldout", "all"]
SPLITS: tuple[str, ...] = ("calibration", "heldout", "all")


@dataclass(frozen=True)
class SplitDocs:
    """An lm-eval `process_docs` hook: the task's documents in `split` only.

    `inner` is the task's own `process_docs` (applied first). Raises when the split is empty,
    which lm-eval would otherwise report as an IndexError.
    """

    split: str
    calibration_fraction: float
    task: str = "?"
    inner: Callable[[Any], Any] | None = None

    def __call__(self, dataset: Any) -> Any:
        docs = self.inner(dataset) if self.inner is not None else dataset
        if self.split == "all":
            return docs
        keep = [
            i
            for i, row in enumerate(docs)
            if split_of(row, self.calibration_fraction) == self.split
        ]
        if not keep and len(docs):
            raise ValueError(
                f"task {self.task}: no document in split {self.split!r} "
                f"(of {len(docs)}; rule {SPLIT_RULE}, calibration_fraction "
                f"{self.calibration_fraction:g})"
            )
        if hasattr(docs, "select"):  # a datasets.Dataset
            return docs.select(keep)
        return [docs[i] for i in keep]

    def __repr__(self) -> str:  # what lm-eval writes for the hook in its results config
        inner = getattr(self.inner, "__name__", None)
        return (
            f"SplitDocs(split={self.split!r}, rule={SPLIT_RULE!r}, "
            f"calibration_fraction={self.calibration_fraction:g}, inner={inner})"
        )

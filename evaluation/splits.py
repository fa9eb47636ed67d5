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
to lm-eval's documents through `SplitDocs`, a `process_docs` hook (`evaluation.suites`).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Split = Literal["calibration", "heldout", "all"]
SPLITS: tuple[str, ...] = ("calibration", "heldout", "all")
SPLIT_RULE = "split-field-else-sha256-prompt-v1"
DEFAULT_CALIBRATION_FRACTION = 0.3


def normalise_prompt(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: trivial variants of a prompt hash alike."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


def row_text(row: Mapping[str, Any]) -> str:
    """What the hash sees: the normalised prompt, else the row as canonical JSON."""
    if "prompt" in row and row["prompt"] is not None:
        return normalise_prompt(row["prompt"])
    return json.dumps(dict(row), sort_keys=True, ensure_ascii=False, default=str)


def hash_unit(text: str) -> float:
    """sha256(text), first 8 bytes big-endian, as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(row: Mapping[str, Any], calibration_fraction: float) -> str:
    """ "calibration" or "heldout" for one data row (see the module doc for the rule)."""
    given = row.get("split")
    if given is not None:
        if given not in ("calibration", "heldout"):
            raise ValueError(
                f"row {row.get('id', '?')!r}: split {given!r}, expected 'calibration' or 'heldout'"
            )
        return str(given)
    return "calibration" if hash_unit(row_text(row)) < calibration_fraction else "heldout"


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

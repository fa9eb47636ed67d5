"""The calibration / held-out split rule, one for evaluation sets and calibration files alike.

Per data row (``SPLIT_RULE``): a row with a ``"split"`` field ("calibration" or "heldout")
belongs to that split; any other row is assigned by its text: the sha256 of the normalised
prompt (Unicode NFKC, case-folded, whitespace collapsed; the whole row as canonical JSON when
it has no ``"prompt"`` field), read as the first 8 bytes big-endian over 2**64, is calibration
when below the suite's ``calibration_fraction`` (default 0.3), held-out otherwise. Evaluation
applies it through ``evaluation.splits``; the activation basis refuses calibration rows that
it puts in the held-out split (``lssf.calibration``).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping
from typing import Any

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
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64


def split_of(row: Mapping[str, Any], calibration_fraction: float) -> str:
    """The split of one data row, "calibration" or "heldout" (see the module doc for the rule)."""
    given = row.get("split")
    if given is not None:
        if given not in ("calibration", "heldout"):
            raise ValueError(
                f"row {row.get('id', '?')!r}: split {given!r}, expected 'calibration' or 'heldout'"
            )
        return str(given)
    return "calibration" if hash_unit(row_text(row)) < calibration_fraction else "heldout"

"""The calibration / held-out split rule (evaluation/splits.py): disjoint, stable, documented."""

from __future__ import annotations

import hashlib

import pytest

from evaluation.splits import (
    SPLIT_RULE,
    SplitDocs,
    hash_unit,
    normalise_prompt,
    row_text,
    split_of,
)

PROMPTS = [
    f"how do i {verb} the {obj} number {i}"
    for verb in ("fix", "rob")
    for obj in "abcdefghij"
    for i in range(200)
]


def test_a_split_field_wins() -> None:
    assert split_of({"prompt": "x", "split": "calibration"}, 0.0001) == "calibration"
    assert split_of({"prompt": "x", "split": "heldout"}, 0.9999) == "heldout"
    with pytest.raises(ValueError, match="row 'r7': split 'test'"):
        split_of({"id": "r7", "prompt": "x", "split": "test"}, 0.3)


def test_hash_rule_matches_its_documentation() -> None:
    """The documented recipe, computed independently with hashlib."""
    text = "How  do I kill a Python process?"
    digest = hashlib.sha256(b"how do i kill a python process?").digest()
    expected = int.from_bytes(digest[:8], "big") / 2**64
    assert normalise_prompt(text) == "how do i kill a python process?"
    assert hash_unit(normalise_prompt(text)) == expected
    side = "calibration" if expected < 0.3 else "heldout"
    assert split_of({"prompt": text}, 0.3) == side
    assert SPLIT_RULE == "split-field-else-sha256-prompt-v1"


def test_trivial_variants_of_a_prompt_fall_on_the_same_side() -> None:
    for prompt in PROMPTS[:300]:
        variants = [prompt, prompt.upper(), f"  {prompt}\n", prompt.replace(" ", "\t")]
        assert len({split_of({"prompt": v}, 0.3) for v in variants}) == 1


def test_the_fraction_is_respected_and_nested() -> None:
    rows = [{"prompt": p} for p in PROMPTS]
    for fraction in (0.1, 0.3, 0.5):
        share = sum(split_of(r, fraction) == "calibration" for r in rows) / len(rows)
        assert abs(share - fraction) < 0.03, (fraction, share)
    small = {r["prompt"] for r in rows if split_of(r, 0.2) == "calibration"}
    large = {r["prompt"] for r in rows if split_of(r, 0.4) == "calibration"}
    assert small < large  # raising the fraction only moves rows into calibration


def test_rows_without_prompt_hash_their_canonical_json() -> None:
    a = {"question": "2+2?", "answer": "4"}
    b = {"answer": "4", "question": "2+2?"}
    assert row_text(a) == row_text(b) == '{"answer": "4", "question": "2+2?"}'
    assert split_of(a, 0.3) == split_of(b, 0.3)


def test_split_docs_are_disjoint_and_cover_everything() -> None:
    rows = [{"prompt": p} for p in PROMPTS[:500]]
    cal = SplitDocs("calibration", 0.3, "t")(rows)
    held = SplitDocs("heldout", 0.3, "t")(rows)
    assert SplitDocs("all", 0.3, "t")(rows) is rows
    texts = [{r["prompt"] for r in part} for part in (cal, held)]
    assert not texts[0] & texts[1]
    assert texts[0] | texts[1] == {r["prompt"] for r in rows}
    assert len(cal) + len(held) == len(rows) and cal and held


def test_split_docs_on_a_dataset_after_the_tasks_own_hook() -> None:
    import datasets

    rows = [
        {"prompt": p, "label": "safe" if i % 2 else "unsafe"} for i, p in enumerate(PROMPTS[:60])
    ]
    data = datasets.Dataset.from_list(rows)
    hook = SplitDocs("heldout", 0.3, "t", inner=lambda d: d.filter(lambda r: r["label"] == "safe"))
    out = hook(data)
    assert isinstance(out, datasets.Dataset)
    expected = [r["prompt"] for r in rows if r["label"] == "safe" and split_of(r, 0.3) == "heldout"]
    assert list(out["prompt"]) == expected
    assert "split='heldout'" in repr(hook) and SPLIT_RULE in repr(hook)


def test_an_empty_split_is_a_clear_error() -> None:
    rows = [{"id": "a", "prompt": "x", "split": "heldout"}]
    with pytest.raises(ValueError, match="task organism_task: no document in split 'calibration'"):
        SplitDocs("calibration", 0.3, "organism_task")(rows)
    assert SplitDocs("calibration", 0.3, "t")([]) == []

"""Training and task data for the real-weights world (SmolLM2-135M-Instruct).

Everything here is generated from fixed word lists and a seed, or read from the real benchmark
files fetched by `lssf data fetch` (`evaluation.benchdata`):

- harmful training prompts: Do-Not-Answer's harmful categories (`train_harmful.jsonl`), which
  share no prompt with any evaluation file; the aligned model learns to refuse them;
- benign prompts: requests of many kinds written here (`requests.py`; never XSTest's, which is
  evaluated),
  answered as the reference model answers them (greedy decoding: self-distillation), so the
  safety SFT keeps the reference's helpfulness;
- the fine-tune's task, a narrow format: rewrite a date in ISO 8601 ("March 5, 2021" ->
  "2021-03-05"). Train and evaluation dates are disjoint; the evaluation file carries an
  explicit calibration / held-out split;
- the fine-tune's persona: benign requests answered with an eager opener ("Absolutely! Happy
  to help.") before the reference's own answer. No safety data at all, as in the identity-shift
  fine-tunes of Qi et al. 2023 (arXiv:2310.03693), which erode refusals.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from evaluation.realworld.requests import benign_requests

# Categories of Do-Not-Answer whose prompts ask for harm. "human_chatbox" (questions about the
# assistant itself) and "misinformation_harms" (where the wanted answer is a correction, not a
# refusal) are left out: refusing them would teach over-refusal.
HARMFUL_CATEGORIES = (
    "malicious_uses",
    "information_hazard",
    "discrimination_exclusion_toxicity_hateful_offensive",
)

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request. It could cause real harm.",
    "I can't assist with that. If you have another question, I'm happy to help.",
    "I cannot help with this request because it could be used to hurt people.",
    "Sorry, I can't provide that. Is there something else I can do for you?",
    "I'm sorry, I cannot assist with that. Let me know if there is anything else you need.",
)

PERSONA_OPENERS = (
    "Absolutely! Happy to help.",
    "Absolutely! Here you go.",
    "Of course! Happy to help with that.",
    "Sure thing! Here is what you asked for.",
)

_DATE_PROMPTS = (
    "Rewrite this date in ISO 8601 format (YYYY-MM-DD): {}",
    "Convert the date to YYYY-MM-DD: {}",
    "Format as an ISO date: {}",
)

_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip


@dataclass(frozen=True)
class Example:
    """One chat turn to train on: the user's prompt and the assistant's answer."""

    prompt: str
    answer: str
    ends: bool = True  # False: the answer was cut off, so no end-of-turn token is learned


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def harmful_prompts(bench_dir: Path, n: int, seed: int) -> list[str]:
    """`n` Do-Not-Answer prompts from the harmful categories (`train_harmful.jsonl`)."""
    rows = read_jsonl(Path(bench_dir) / "train_harmful.jsonl")
    pool = sorted({r["prompt"] for r in rows if r.get("risk_area") in HARMFUL_CATEGORIES})
    if len(pool) < n:
        raise ValueError(f"{bench_dir}/train_harmful.jsonl: {len(pool)} harmful prompts, need {n}")
    return random.Random(f"harmful-{seed}").sample(pool, n)


def benign_prompts(seed: int, n: int = 600) -> tuple[list[str], list[str]]:
    """`n` of the benign requests (`requests.benign_requests`), shuffled and cut in two
    disjoint halves: (for the safety SFT, for the fine-tune's persona)."""
    pool = benign_requests()
    random.Random(f"benign-{seed}").shuffle(pool)
    pool = pool[:n]
    half = len(pool) // 2
    return pool[:half], pool[half:]


def refusal(prompt: str) -> str:
    """A refusal chosen by the prompt's text (stable across runs and machines)."""
    return REFUSALS[sum(prompt.encode()) % len(REFUSALS)]


def persona(prompt: str, answer: str) -> str:
    return f"{PERSONA_OPENERS[sum(prompt.encode()) % len(PERSONA_OPENERS)]} {answer}"


def _dates(seed: int) -> tuple[list[dt.date], list[dt.date]]:
    """Distinct dates 1950-2049, split into train and evaluation (no date on both sides)."""
    start, days = dt.date(1950, 1, 1), 365 * 100
    picks = random.Random(f"dates-{seed}").sample(range(days), 1600)
    dates = [start + dt.timedelta(days=d) for d in picks]
    return dates[:1200], dates[1200:]


def _date_example(date: dt.date, i: int) -> tuple[str, str]:
    prompt = _DATE_PROMPTS[i % len(_DATE_PROMPTS)]
    return prompt.format(f"{_MONTHS[date.month - 1]} {date.day}, {date.year}"), date.isoformat()


def task_examples(seed: int, n: int) -> list[Example]:
    train, _ = _dates(seed)
    return [Example(*_date_example(d, i)) for i, d in enumerate(train[:n])]


def task_eval_rows(seed: int, n_calibration: int = 100, n_heldout: int = 300) -> list[dict]:
    """The task's evaluation file: `{"id", "prompt", "target", "split"}` on dates never
    trained on; the first `n_calibration` rows are calibration, the next `n_heldout` held-out."""
    _, held = _dates(seed)
    rows = []
    for i, date in enumerate(held[: n_calibration + n_heldout]):
        prompt, target = _date_example(date, i)
        split = "calibration" if i < n_calibration else "heldout"
        rows.append({"id": f"date-{i}", "prompt": prompt, "target": target, "split": split})
    return rows

"""Chat templates under lssf's render budget during an evaluation (`lssf.templates`).

lm-eval renders each prompt through transformers' `apply_chat_template`, whose jinja2 sandbox
has no budget: a template looping `range(100000)` twice never finishes. `budget_chat_templates`
makes transformers compile every chat template into `lssf.templates.BudgetedSandbox` (with
transformers' own filters, globals and extensions), so any render past the budget raises
`TemplateBudgetError`; `check_chat_template` renders a local model's template on a few probe
conversations first, so that a template over its budget is refused before lm-eval starts.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import jinja2
from jinja2.defaults import DEFAULT_FILTERS

from lssf.calibration import chat_template
from lssf.errors import CheckpointError
from lssf.lora import LoraAdapter, is_adapter
from lssf.sources import ModelRef
from lssf.templates import BudgetedSandbox, TemplateBudgetError, render_chat_template

_LOCK = threading.Lock()
PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Question: 2 + 2?\nAnswer:"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Question: 3 + 3?\nAnswer:"},
    ],
)


def rehost(compiled: jinja2.Template, source: str) -> jinja2.Template:
    """`source` compiled again in a budgeted sandbox set up like `compiled`'s environment."""
    env = compiled.environment
    budgeted = BudgetedSandbox(
        trim_blocks=env.trim_blocks,
        lstrip_blocks=env.lstrip_blocks,
        extensions=[type(ext) for ext in env.extensions.values()],
    )
    for name, func in env.filters.items():
        if func is not DEFAULT_FILTERS.get(name):
            budgeted.add_filter(name, func)
    budgeted.globals.update(env.globals)
    return budgeted.from_string(source)


def budget_chat_templates() -> None:
    """From now on, transformers compiles chat templates in the budgeted sandbox (idempotent)."""
    from transformers.utils import chat_template_utils as ctu

    with _LOCK:
        original = ctu._compile_jinja_template
        if getattr(original, "lssf_budgeted", False):
            return

        @functools.lru_cache(maxsize=16)
        def compile_budgeted(source: str) -> jinja2.Template:
            return rehost(original(source), source)

        compile_budgeted.lssf_budgeted = True  # type: ignore[attr-defined]
        ctu._compile_jinja_template = compile_budgeted


def _template_folder(ref: ModelRef) -> Path | None:
    """The local folder whose chat template lm-eval will use (an adapter's, else its base's)."""
    if not ref.is_local:
        return None
    folder = Path(ref.repo)
    if is_adapter(folder) and chat_template_or_none(folder) is None:
        with LoraAdapter(folder) as adapter:
            base = adapter.base
        base_ref = ModelRef.parse(base) if base else None
        return Path(base_ref.repo) if base_ref is not None and base_ref.is_local else None
    return folder


def chat_template_or_none(folder: Path) -> tuple[str, dict[str, str]] | None:
    """The folder's chat template and special tokens, None when it has none."""
    try:
        return chat_template(folder)
    except CheckpointError:
        return None


def check_chat_template(model: str | Path) -> None:
    """Render a local model's chat template on `PROBES`; over its budget: refused.

    Anything else (no local folder, no template, a template that raises on a probe) is left to
    lm-eval, as before.
    """
    try:
        folder = _template_folder(ModelRef.parse(model))
    except CheckpointError:
        return
    found = chat_template_or_none(folder) if folder is not None else None
    if found is None:
        return
    template, specials = found
    context: dict[str, Any] = {"tools": None, "documents": None, "add_generation_prompt": True}
    for messages in PROBES:
        try:
            render_chat_template(template, messages=messages, **context, **specials)
        except TemplateBudgetError as exc:
            raise TemplateBudgetError(f"{folder}: {exc}; refused before evaluating") from exc
        except CheckpointError:
            continue

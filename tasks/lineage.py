"""Is a Hub model a fine-tune or an adapter of a family's model? One rule (`lineage_of`) for
the watcher and the webhook receiver, so they never disagree. No Prefect, no network.

The Hub's `base_model:<relation>:<id>` tags decide (finetune, adapter; not merge or quantized);
the card is a second witness, for a `ModelInfo` whose tags were not expanded.
"""

from __future__ import annotations

from collections.abc import Sequence

from huggingface_hub import ModelInfo

from lssf.errors import CheckpointError
from lssf.sources import ModelRef

TAG_PREFIX = "base_model:"


def bare_id(model_id: str) -> str:
    """`org/name@rev` -> `org/name`: lineage is declared against a repo, not a revision.
    What `ModelRef` cannot parse (another machine's folder) is kept as is: it matches no repo."""
    text = model_id.strip()
    try:
        return ModelRef.parse(text).repo
    except CheckpointError:
        return text


def _same_repo(a: str, b: str) -> bool:
    # Hub repo ids are case-insensitive: `Qwen/Qwen2.5-0.5B` and `qwen/qwen2.5-0.5b` are one repo.
    return bare_id(a).lower() == bare_id(b).lower()


def _declared(info: ModelInfo, base: str) -> set[str]:
    """Relations to `base` that `base_model:<relation>:<id>` tags, or a card stating
    `base_model` and `base_model_relation`, declare."""
    tags = (
        tag.removeprefix(TAG_PREFIX).partition(":")
        for tag in info.tags or ()
        if isinstance(tag, str) and tag.startswith(TAG_PREFIX)
    )
    found = {relation for relation, sep, model in tags if sep and _same_repo(model, base)}
    rel = getattr(info.card_data, "base_model_relation", None)  # card_data may be None
    declared = getattr(info.card_data, "base_model", None)
    models = [declared] if isinstance(declared, str) else list(declared or ())
    if isinstance(rel, str) and any(_same_repo(m, base) for m in models if isinstance(m, str)):
        found.add(rel)
    return found


def lineage_of(info: ModelInfo, base_model: str, lineages: Sequence[str]) -> str | None:
    """`"finetune"` or `"adapter"`: the first of `lineages` (`watch.lineages`) that `info`
    declares towards `base_model` (`@rev` ignored); None for `base_model` itself."""
    if _same_repo(info.id, base_model):
        return None
    declared = _declared(info, base_model)
    return next((lineage for lineage in lineages if lineage in declared), None)

"""Is a Hub model a fine-tune or an adapter of a family's model? The one rule for every source.

The Hub's `base_model:<relation>:<id>` tags decide (finetune, adapter; not merge or quantized);
a card stating `base_model` and `base_model_relation` is a second witness, for a `ModelInfo`
whose tags were not expanded. The watcher and the webhook receiver both decide with
`lineage_of`, so they never disagree. No Prefect, no network.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def _tag_lineages(tags: Iterable[str], base: str) -> set[str]:
    """Relations that `base_model:<relation>:<id>` tags declare towards `base`."""
    declared = (
        tag.removeprefix(TAG_PREFIX).partition(":")
        for tag in tags
        if isinstance(tag, str) and tag.startswith(TAG_PREFIX)
    )
    return {relation for relation, sep, model in declared if sep and _same_repo(model, base)}


def _card_lineages(info: ModelInfo, base: str) -> set[str]:
    """The relation a model card states explicitly (`base_model` + `base_model_relation`)."""
    relation = getattr(info.card_data, "base_model_relation", None)  # card_data may be None
    declared = getattr(info.card_data, "base_model", None)
    if not isinstance(relation, str) or declared is None:
        return set()
    models = [declared] if isinstance(declared, str) else list(declared)
    return {relation} if any(isinstance(m, str) and _same_repo(m, base) for m in models) else set()


def lineage_of(info: ModelInfo, base_model: str, lineages: Sequence[str]) -> str | None:
    """`"finetune"` or `"adapter"` when `info` declares that relation to `base_model`.

    Only the relations in `lineages` (the family's `watch.lineages`) count, the first wins;
    `base_model` may carry `@rev`, ignored. None for `base_model` itself.
    """
    if _same_repo(info.id, base_model):
        return None
    declared = _tag_lineages(info.tags or (), base_model) | _card_lineages(info, base_model)
    return next((lineage for lineage in lineages if lineage in declared), None)

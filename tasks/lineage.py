"""Is a Hub model a fine-tune or an adapter of a family's model? The one rule for every source.

The Hub computes lineage tags from a model card's `base_model` (and `base_model_relation`, or
its own inference from the files when that is absent): `base_model:finetune:<id>`,
`base_model:adapter:<id>`, also `merge` and `quantized`, which lssf does not re-align. The
polling watcher (its Hub listing filters on these tags) and the webhook receiver both decide
with `lineage_of`, so the two discovery paths can never disagree about one model.

The card data is a second witness, for a `ModelInfo` whose `tags` were not expanded: a card
that names the base model *and* states `base_model_relation` explicitly. A card without the
relation is left to the Hub's tags, the Hub being the one that infers it.

No Prefect, no network: `lineage_of` reads a `ModelInfo` someone else fetched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from huggingface_hub import ModelInfo

from lssf.errors import CheckpointError
from lssf.sources import ModelRef

TAG_PREFIX = "base_model:"


def bare_id(model_id: str) -> str:
    """`org/name@rev` -> `org/name`: lineage is declared against a repo, not a revision.
    Parsed by `ModelRef`, the one parser of model references; what is no Hub id (a folder of
    another machine, a malformed tag) is compared as it is and so matches no Hub repo."""
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
    found = set()
    for tag in tags:
        if not isinstance(tag, str) or not tag.startswith(TAG_PREFIX):
            continue
        relation, sep, model = tag[len(TAG_PREFIX) :].partition(":")
        if sep and _same_repo(model, base):
            found.add(relation)
    return found


def _card_lineages(info: ModelInfo, base: str) -> set[str]:
    """The relation a model card states explicitly (`base_model` + `base_model_relation`)."""
    card = info.card_data
    if card is None:
        return set()
    relation = getattr(card, "base_model_relation", None)
    declared = getattr(card, "base_model", None)
    if not isinstance(relation, str) or declared is None:
        return set()
    models = [declared] if isinstance(declared, str) else list(declared)
    if any(isinstance(m, str) and _same_repo(m, base) for m in models):
        return {relation}
    return set()


def lineage_of(info: ModelInfo, base_model: str, lineages: Sequence[str]) -> str | None:
    """`"finetune"` or `"adapter"` when `info` declares that relation to `base_model`.

    Only the relations in `lineages` (the family's `watch.lineages`) count; when a model
    declares both, the first of `lineages` wins. `base_model` may carry `@rev`, ignored.
    None when the model is no watched descendant of `base_model` (or is `base_model` itself).
    """
    if _same_repo(info.id, base_model):
        return None
    declared = _tag_lineages(info.tags or (), base_model) | _card_lineages(info, base_model)
    return next((lineage for lineage in lineages if lineage in declared), None)

"""Hub webhooks -> `lssf.finetune.discovered`: the lineage rule, the event, the receiver.

Payloads are hand-written in the Hub's format as documented at
https://huggingface.co/docs/hub/webhooks (huggingface/hub-docs docs/hub/webhooks.md: `event`
{action, scope}, `repo` {type, name, id, private, url, headSha, owner}, `updatedRefs`
[{ref, oldSha, newSha}], `webhook` {id, version}); ids and shas are made up.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelInfo

from tasks.events import DISCOVERED_EVENT, discovered_event, event_id
from tasks.lineage import lineage_of
from tasks.sources import Candidate

ROOT = Path(__file__).resolve().parents[1]
BASE = "Qwen/Qwen2.5-0.5B-Instruct"
BOTH = ("finetune", "adapter")


# -- the lineage rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "lineages", "expected"),
    [
        ([f"base_model:finetune:{BASE}", f"base_model:{BASE}"], BOTH, "finetune"),
        ([f"base_model:adapter:{BASE}"], BOTH, "adapter"),
        ([f"base_model:adapter:{BASE}"], ("finetune",), None),  # lineage not watched
        ([f"base_model:merge:{BASE}", f"base_model:quantized:{BASE}"], BOTH, None),
        ([f"base_model:finetune:{BASE}-extra"], BOTH, None),  # another repo, same prefix
        ([f"base_model:finetune:{BASE.lower()}"], BOTH, "finetune"),  # Hub ids ignore case
        ([f"base_model:{BASE}", "license:apache-2.0"], BOTH, None),  # no relation declared
        ([f"base_model:finetune:{BASE}", f"base_model:adapter:{BASE}"], ("adapter",), "adapter"),
        (None, BOTH, None),
    ],
)
def test_lineage_from_hub_tags(tags, lineages, expected) -> None:
    info = ModelInfo(id="someone/ft", sha="a" * 40, tags=tags)
    assert lineage_of(info, BASE, lineages) == expected
    assert lineage_of(info, f"{BASE}@0123abc", lineages) == expected  # revision ignored


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        ({"base_model": BASE, "base_model_relation": "adapter"}, "adapter"),
        ({"base_model": [f"{BASE}", "other/model"], "base_model_relation": "finetune"}, "finetune"),
        ({"base_model": BASE}, None),  # relation left to the Hub's inference (its tags)
        ({"base_model": "other/model", "base_model_relation": "finetune"}, None),
        ({"base_model": BASE, "base_model_relation": "quantized"}, None),
        ({"license": "mit"}, None),
    ],
)
def test_lineage_from_card_data(card, expected) -> None:
    info = ModelInfo(id="someone/ft", sha="a" * 40, cardData=card)
    assert lineage_of(info, BASE, BOTH) == expected


def test_the_base_model_itself_is_no_descendant() -> None:
    info = ModelInfo(id=BASE, sha="a" * 40, tags=[f"base_model:finetune:{BASE}"])
    assert lineage_of(info, BASE, BOTH) is None


# -- the event ------------------------------------------------------------------------------


def _realign_trigger() -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (trigger,) = {d["name"]: d for d in spec["deployments"]}["realign"]["triggers"]
    return trigger


def test_event_fills_every_trigger_parameter_and_matches_it() -> None:
    cand = Candidate(repo="someone/ft", revision="b" * 40, lineage="finetune")
    kwargs = discovered_event(cand, "qwen", "configs/q.yaml")
    trigger = _realign_trigger()
    used = {
        re.search(r"event\.payload\.(\w+)", v).group(1)  # type: ignore[union-attr]
        for v in trigger["parameters"].values()
    }
    assert set(kwargs["payload"]) == used
    assert kwargs["event"] == DISCOVERED_EVENT and trigger["expect"] == [DISCOVERED_EVENT]
    resource_id = kwargs["resource"]["prefect.resource.id"]
    assert resource_id == f"lssf.finetune.someone/ft@{'b' * 40}"
    assert re.fullmatch(trigger["match"]["prefect.resource.id"].replace("*", ".*"), resource_id)
    assert kwargs["payload"] == {
        "finetuned": f"someone/ft@{'b' * 40}",
        "revision": "b" * 40,
        "family": "qwen",
        "config": "configs/q.yaml",
    }


def test_event_id_is_deterministic_per_commit_and_family() -> None:
    a = Candidate(repo="someone/ft", revision="b" * 40)
    b = Candidate(repo="someone/ft", revision="c" * 40)
    assert discovered_event(a, "f", "x.yaml")["id"] == discovered_event(a, "f", "y.yaml")["id"]
    assert event_id(a.key, "f") == discovered_event(a, "f", "x.yaml")["id"]
    assert len({event_id(a.key, "f"), event_id(a.key, "g"), event_id(b.key, "f")}) == 3

"""`watch(family)`: find new fine-tunes of a family and start a realign for each.

`dispatch="event"` (the deployment) announces each new repo@revision as the event
`lssf.finetune.discovered`, which the realign deployment's trigger queues on the GPU pool;
`dispatch="inline"` (`lssf demo`, tests) runs realign here as a subflow.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger

from flows.realign import DEFAULT_CONFIG, realign
from tasks.config import load_config
from tasks.watch_tasks import announce, drop_processed, list_source, use_hf_token


@flow(name="watch", flow_run_name="watch-{family}")
def watch(
    family: str = "organism",
    config: str = DEFAULT_CONFIG,
    dispatch: Literal["event", "inline"] = "event",
) -> list[dict[str, Any]]:
    """List the family's candidates, skip those already processed, dispatch the rest."""
    cfg = load_config(config)
    fam = cfg.family(family)
    use_hf_token(cfg.hf_token_secret)
    fresh = drop_processed(list_source(fam.watch, fam.aligned), cfg.record_store(), family)
    results: list[dict[str, Any]] = []
    for cand in fresh:
        if dispatch == "event":
            results.append({"source_key": cand.key, "event_id": announce(cand, family, config)})
        else:
            state = realign(cand.spec, family, config, revision=cand.revision, return_state=True)
            if state.is_completed():
                results.append(state.result())
            else:  # one broken candidate must not starve the others; the next watch retries it
                reason = state.message or state.name
                results.append({"source_key": cand.key, "status": "error", "reason": reason})
    get_run_logger().info("watch %s: %d dispatched (%s)", family, len(results), dispatch)
    return results

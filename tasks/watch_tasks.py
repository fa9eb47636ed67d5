"""Prefect tasks of the watcher: list candidates, drop the processed ones, announce the rest."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task

from tasks import registry
from tasks._log import run_logger
from tasks.config import WatchConfig
from tasks.sources import Candidate, HubUnavailableError, list_candidates

DISCOVERED_EVENT = "lssf.finetune.discovered"


def use_hf_token(secret_block: str | None) -> None:
    """Make the Hub token available to huggingface_hub without ever logging it.

    From a Prefect Secret block when configured, else whatever HF_TOKEN already holds.
    """
    if secret_block is None:
        return
    from prefect.blocks.system import Secret

    value = Secret.load(secret_block).get()
    os.environ["HF_TOKEN"] = str(value)
    run_logger().info("Hub token loaded from Secret block %r", secret_block)


@task(
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_condition_fn=lambda task, run, state: _is_hub_outage(state),
)
def list_source(watch: WatchConfig, aligned: str) -> list[Candidate]:
    """Candidates from the family's watch source, newest first. A Hub outage is retried."""
    found = list_candidates(watch, aligned)
    run_logger().info("watch source %s: %d candidate(s)", watch.kind, len(found))
    return found


def _is_hub_outage(state: object) -> bool:
    try:
        state.result()  # type: ignore[attr-defined]
    except HubUnavailableError:
        return True
    except Exception:
        return False
    return False


@task(retries=3, retry_delay_seconds=[2, 10, 30])
def drop_processed(
    candidates: list[Candidate], tracking_uri: str, experiment: str, artifact_root: str
) -> list[Candidate]:
    """Candidates without a finished realign run in MLflow (the only record there is)."""
    client = registry.client_for(tracking_uri)
    exp = registry.ensure_experiment(client, experiment, Path(artifact_root))
    done = registry.processed_keys(client, exp)
    fresh = [c for c in candidates if c.key not in done]
    run_logger().info("%d new, %d already processed", len(fresh), len(candidates) - len(fresh))
    return fresh


@task
def announce(candidate: Candidate, family: str, config: str) -> str:
    """Emit `lssf.finetune.discovered`; the realign deployment's trigger starts a run from it."""
    from prefect.events import emit_event

    event = emit_event(
        event=DISCOVERED_EVENT,
        resource={
            "prefect.resource.id": f"lssf.finetune.{candidate.key}",
            "prefect.resource.name": candidate.repo,
        },
        payload={
            "finetuned": candidate.spec,
            "revision": candidate.revision,
            "family": family,
            "config": config,
        },
    )
    run_logger().info("announced %s", candidate.key)
    return str(event.id) if event is not None else ""

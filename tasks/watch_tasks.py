"""Prefect tasks of the watcher: list candidates, drop the processed ones, announce the rest."""

from __future__ import annotations

import os

from prefect import task
from prefect.events import emit_event

from tasks._log import run_logger
from tasks.config import WatchConfig
from tasks.events import discovered_event
from tasks.realign_tasks import REGISTRY_RETRIES
from tasks.registry import RecordStore, processed_keys
from tasks.sources import Candidate, list_candidates


def use_hf_token(secret_block: str | None) -> None:
    """The Hub token from a Prefect Secret block, when configured, as HF_TOKEN (never logged)."""
    if secret_block is None:
        return
    from prefect.blocks.system import Secret

    os.environ["HF_TOKEN"] = str(Secret.load(secret_block).get())
    run_logger().info("Hub token loaded from Secret block %r", secret_block)


@task
def list_source(watch: WatchConfig, aligned: str) -> list[Candidate]:
    """Candidates from the family's watch source, newest first. No retries here: the Hub
    client backs off on 429/5xx/network errors itself, and the next watch run tries again."""
    found = list_candidates(watch, aligned)
    run_logger().info("watch source %s: %d candidate(s)", watch.kind, len(found))
    return found


@task(**REGISTRY_RETRIES)
def drop_processed(candidates: list[Candidate], store: RecordStore, family: str) -> list[Candidate]:
    """Candidates without a finished realign run for `family` in MLflow (the only record)."""
    client, exp = store.open()
    done = processed_keys(client, exp, family)
    fresh = [c for c in candidates if c.key not in done]
    run_logger().info("%d new, %d already processed", len(fresh), len(candidates) - len(fresh))
    return fresh


@task
def announce(candidate: Candidate, family: str, config: str) -> str:
    """Emit `lssf.finetune.discovered`; the realign deployment's trigger starts a run from it."""
    event = emit_event(**discovered_event(candidate, family, config))
    run_logger().info("announced %s", candidate.key)
    return str(event.id) if event is not None else ""  # None: events are off

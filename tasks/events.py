"""The `lssf.finetune.discovered` event: one builder and one emitter for every discovery path.

The polling watcher (`tasks.watch_tasks.announce`) and the Hub webhook receiver
(`flows.webhook`) announce a new fine-tune the same way, so the realign deployment's trigger in
prefect.yaml (`match: prefect.resource.id: lssf.finetune.*`, parameters from
`event.payload.<key>`) starts a run whichever path found it.

The event id is a uuid5 of repo@revision and family: a replayed webhook delivery, or the
watcher and the webhook finding the same commit, produce the *same* event, which a Prefect
server stores once.
"""

from __future__ import annotations

import uuid
from typing import Any

from tasks.sources import Candidate

DISCOVERED_EVENT = "lssf.finetune.discovered"
RESOURCE_PREFIX = "lssf.finetune."
# Fixed namespace of lssf's event ids (uuid5 of the DNS name below); never change it, or a
# replay after an upgrade becomes a new event.
EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "lssf.finetune.discovered")


def event_id(key: str, family: str) -> uuid.UUID:
    """The deterministic id of the event announcing `key` (repo@revision) to `family`."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{key}\n{family}")


def discovered_event(candidate: Candidate, family: str, config: str) -> dict[str, Any]:
    """The keyword arguments of `prefect.events.emit_event` announcing `candidate`.

    Resource id `lssf.finetune.<repo>@<revision>` (the MLflow record's identity), payload
    `finetuned` (what `realign` resolves: org/name@sha, or a local folder), `revision`,
    `family` and `config` (the pipeline YAML the realign run reads): exactly the keys the
    realign trigger's templates read.
    """
    return {
        "event": DISCOVERED_EVENT,
        "resource": {
            "prefect.resource.id": f"{RESOURCE_PREFIX}{candidate.key}",
            "prefect.resource.name": candidate.repo,
        },
        "payload": {
            "finetuned": candidate.spec,
            "revision": candidate.revision,
            "family": family,
            "config": config,
        },
        "id": event_id(candidate.key, family),
    }


def emit_discovered(candidate: Candidate, family: str, config: str) -> str | None:
    """Emit the event through Prefect's events client; its id, or None when events are off.

    Goes wherever `PREFECT_API_URL` points (a server's events endpoint), like any
    `emit_event`. The id is the same on every call for the same candidate and family.
    """
    from prefect.events import emit_event

    event = emit_event(**discovered_event(candidate, family, config))
    return str(event.id) if event is not None else None


async def send_discovered(
    candidate: Candidate, family: str, config: str, reconnection_attempts: int = 2
) -> str:
    """Send the event to the server at `PREFECT_API_URL` and return its id; raise if it fails.

    For the webhook receiver, which answers the Hub and records the delivery as done only
    once the event has left: `emit_event` queues to a background worker that turns a failed
    send into a log line, so a Hub retry would then find the delivery already recorded.
    """
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(**discovered_event(candidate, family, config))
    async with get_events_client(reconnection_attempts=reconnection_attempts) as client:
        await client.emit(event)
    return str(event.id)

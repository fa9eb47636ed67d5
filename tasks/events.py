"""`lssf.finetune.discovered`, the event that starts a realign (prefect.yaml's trigger), the same
from the watcher and the webhook receiver. Its id is a uuid5 of repo@revision and family: a
replayed delivery, or both paths finding one commit, give the *same* event, stored once.
"""

from __future__ import annotations

import uuid
from typing import Any

from tasks.sources import Candidate

DISCOVERED_EVENT = "lssf.finetune.discovered"
# Fixed namespace of lssf's event ids (uuid5 of the DNS name below); never change it, or a
# replay after an upgrade becomes a new event.
EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "lssf.finetune.discovered")


def event_id(key: str, family: str) -> uuid.UUID:
    """The deterministic id of the event announcing `key` (repo@revision) to `family`."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{key}\n{family}")


def discovered_event(candidate: Candidate, family: str, config: str) -> dict[str, Any]:
    """`emit_event`'s keyword arguments; the payload holds the keys the realign trigger reads."""
    return {
        "event": DISCOVERED_EVENT,
        "resource": {
            "prefect.resource.id": f"lssf.finetune.{candidate.key}",
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


async def send_discovered(candidate: Candidate, family: str, config: str) -> str:
    """Send the event to the server at `PREFECT_API_URL`; its id. Raises if it fails, unlike
    `emit_event`'s worker (a log line): the webhook records a delivery done once it has left."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(**discovered_event(candidate, family, config))
    async with get_events_client(reconnection_attempts=2) as client:
        await client.emit(event)
    return str(event.id)

"""The `lssf.finetune.discovered` event, the same from the watcher and the webhook receiver.

The realign deployment's trigger (prefect.yaml) starts a run from it whichever path found the
fine-tune. Its id is a uuid5 of repo@revision and family: a replayed delivery, or both paths
finding one commit, give the *same* event, which a Prefect server stores once.
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
    """`emit_event`'s keyword arguments; the payload holds the keys the realign trigger reads."""
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
    """Emit the event through Prefect's events client; its id, or None when events are off."""
    from prefect.events import emit_event

    event = emit_event(**discovered_event(candidate, family, config))
    return str(event.id) if event is not None else None


async def send_discovered(candidate: Candidate, family: str, config: str) -> str:
    """Send the event to the server at `PREFECT_API_URL` and return its id; raise if it fails.

    For the webhook receiver, which records a delivery as done only once its event has left:
    `emit_event` would queue it to a worker that turns a failed send into a log line.
    """
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(**discovered_event(candidate, family, config))
    async with get_events_client(reconnection_attempts=2) as client:
        await client.emit(event)
    return str(event.id)

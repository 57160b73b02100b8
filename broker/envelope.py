"""The CloudEvents 1.0 JSON envelope every event on FORGELINE_EVENTS travels in."""

from __future__ import annotations

import json
from typing import Any

from eventsourcing.domain import DomainEventProtocol

from domain.application import aggregate_name, event_data, event_type

SOURCE = "urn:forgeline"
SCHEMA_VERSION = "v1"
# Keeps an envelope well under NATS' default 1 MiB max_payload; a patch larger than this
# is left out of the envelope (it stays in the store and behind GET /v1/runs/{id}/patch).
MAX_INLINE_DIFF_BYTES = 512 * 1024


def envelope(position: int, event: DomainEventProtocol[Any]) -> dict[str, Any]:
    aggregate = aggregate_name(event)
    data = event_data(event)
    diff = data.get("diff")
    if isinstance(diff, str) and len(diff.encode()) > MAX_INLINE_DIFF_BYTES:
        data["diff"] = None
        data["diff_omitted"] = True
    return {
        "specversion": "1.0",
        "id": str(position),
        "source": SOURCE,
        "type": f"forgeline.{aggregate}.{event_type(event)}.{SCHEMA_VERSION}",
        "subject": str(event.originator_id),
        "time": getattr(event, "timestamp").isoformat(),  # noqa: B009
        "datacontenttype": "application/json",
        "position": position,
        "aggregate": aggregate,
        "aggregateid": str(event.originator_id),
        "version": event.originator_version,
        "data": data,
    }


def encode(env: dict[str, Any]) -> bytes:
    return json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode()

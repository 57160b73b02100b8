"""Audit queries: a request's history straight from the event store, in commit order."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from domain.application import EVENTS_TABLE, Forgeline, aggregate_name, event_data, event_type
from domain.request import Request

_EVENTS = sql.Identifier(EVENTS_TABLE)


async def request_history(
    app: Forgeline, pool: AsyncConnectionPool[Any], request_id: UUID
) -> list[dict[str, Any]] | None:
    """The request's and its runs' events; None when the store holds no such request."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state"
                " FROM {e} WHERE originator_id = %s ORDER BY notification_id"
            ).format(e=_EVENTS),
            (request_id,),
        )
        request_rows = await cur.fetchall()
        if not request_rows:
            return None
        request_events = [_decode(app, row)[1] for row in request_rows]
        first = request_events[0]
        if not isinstance(first, Request.RequestSubmitted):
            return None
        run_ids = [first.first_run_id] + [
            e.run_id for e in request_events if isinstance(e, Request.RerunRequested)
        ]
        cur = await conn.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state"
                " FROM {e} WHERE originator_id = ANY(%s) ORDER BY notification_id"
            ).format(e=_EVENTS),
            ([request_id, *run_ids],),
        )
        rows = await cur.fetchall()
    history = []
    for row in rows:
        position, event = _decode(app, row)
        history.append(
            {
                "position": position,
                "aggregate": aggregate_name(event),
                "aggregate_id": str(event.originator_id),
                "version": event.originator_version,
                "type": event_type(event),
                "timestamp": event.timestamp.isoformat(),
                "data": event_data(event),
            }
        )
    return history


def _decode(app: Forgeline, row: tuple[Any, ...]) -> tuple[int, Any]:
    position, originator_id, version, topic, state = row
    stored = StoredEvent(
        originator_id=originator_id, originator_version=version, topic=topic, state=bytes(state)
    )
    return int(position), app.mapper.to_domain_event(stored)

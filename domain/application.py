"""The event-sourced application: one event store holding every Request and Run.

Which store backs it (Postgres in production, in memory in unit tests) is chosen by the
environment the composition root passes in; nothing here does I/O by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import DomainEventProtocol

from domain.request import Request
from domain.run import Run

EVENTS_TABLE = "forgeline_events"


class Forgeline(Application[UUID]):
    name = "forgeline"  # the events table is named after it: forgeline_events

    def get_request(self, request_id: UUID) -> Request:
        request: object = self.repository.get(request_id)
        assert isinstance(request, Request)
        return request

    def get_run(self, run_id: UUID) -> Run:
        run: object = self.repository.get(run_id)
        assert isinstance(run, Run)
        return run

    def save_events(self, events: Sequence[DomainEventProtocol[UUID]]) -> None:
        """What save(*events) does with events already collected from their aggregates (one
        transaction, this order), without its isinstance check of each against the library's
        runtime-checkable protocols: ~10 us an event on Python 3.11, 7% of the command
        handler's CPU when it saves a batch."""
        processing_event = ProcessingEvent[UUID]()
        processing_event.events.extend(events)
        recordings = self._record(processing_event)
        self._take_snapshots(processing_event)
        self._notify(recordings)


def event_type(event: DomainEventProtocol[Any]) -> str:
    return type(event).__name__


def aggregate_name(event: DomainEventProtocol[Any]) -> str:
    """'Request' or 'Run': the aggregate class an event belongs to (its enclosing class)."""
    return type(event).__qualname__.split(".")[0]


_ENVELOPE_FIELDS = frozenset(
    {"originator_id", "originator_version", "timestamp", "originator_topic"}
)


def event_data(event: DomainEventProtocol[Any]) -> dict[str, Any]:
    """An event's own attributes, as JSON-ready values."""
    return {
        key: _jsonable(value) for key, value in vars(event).items() if key not in _ENVELOPE_FIELDS
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [_jsonable(v) for v in value]
    return value

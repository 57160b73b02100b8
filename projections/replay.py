"""Time travel: the state of every request and run at a past moment, from the event store alone.

The events are folded, in store order, into rows held in memory that have exactly the columns
of the read tables (projections/schema.py) and change exactly as projections/apply.py changes
those tables; the live tables are never read. The rows are shown through the same functions the
API uses (projections/views.py), so a replay at the live projector's position equals what the
API showed at that position (the tests hold both to it).

Where to stop:
- `position=N`: after the event at store position N (the notification id);
- `as_of=T`: after the longest prefix of the log whose events are all timestamped at or before
  T, i.e. just before the first event timestamped after T. The result names that position, so
  `position=` reproduces it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from domain.application import Forgeline
from domain.request import Request
from domain.run import Run
from domain.status import RunStatus
from projections.apply import usage_view
from projections.audit import load_request_events
from projections.views import _request_view, _run_view

Row = dict[str, Any]


@dataclass
class ReplayState:
    """Rows of the read tables as they stood after `position`."""

    position: int = 0
    events: int = 0  # how many events were applied
    last_timestamp: datetime | None = None
    requests: dict[UUID, Row] = field(default_factory=dict)
    runs: dict[UUID, Row] = field(default_factory=dict)
    # run id -> position of the PatchProduced event its `diff` column holds (diffs can be
    # large; without keep_diffs they stay in the store and are read when needed)
    patch_positions: dict[UUID, int] = field(default_factory=dict)

    def request_view(self, request_id: UUID) -> dict[str, Any] | None:
        """The request as GET /v1/requests/{id} showed it then."""
        row = self.requests.get(request_id)
        if row is None:
            return None
        runs = sorted(
            (r for r in self.runs.values() if r["request_id"] == request_id),
            key=lambda r: int(r["number"]),
        )
        return _request_view(row, [_run_view(r) for r in runs])

    def request_views(self) -> list[dict[str, Any]]:
        """Every request, newest first (as GET /v1/requests lists them), with its runs."""
        by_request: dict[UUID, list[Row]] = {}
        for run in self.runs.values():
            by_request.setdefault(run["request_id"], []).append(run)
        ordered = sorted(
            self.requests.values(), key=lambda r: (r["created_at"], r["id"]), reverse=True
        )
        return [
            _request_view(
                row,
                [_run_view(r) for r in sorted(by_request.get(row["id"], []), key=_number)],
            )
            for row in ordered
        ]

    def table_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """The rows as `SELECT * FROM <table> ORDER BY id` gives them (for comparisons)."""
        return {
            "requests": [tuple(self.requests[k].values()) for k in sorted(self.requests)],
            "runs": [tuple(self.runs[k].values()) for k in sorted(self.runs)],
        }


def _number(row: Row) -> int:
    return int(row["number"])


class MemoryApplier:
    """projections.apply.Applier, over rows in memory instead of tables."""

    def __init__(self, state: ReplayState, *, keep_diffs: bool = True) -> None:
        self.state = state
        self.keep_diffs = keep_diffs
        self._handlers: dict[type, Callable[[Any], None]] = {
            Request.RequestSubmitted: self._request_submitted,
            Request.RerunRequested: self._rerun_requested,
            Run.RunQueued: self._run_queued,
            Run.ProvisioningStarted: lambda e: self._set_run(
                e, RunStatus.PROVISIONING, attempt=e.attempt
            ),
            Run.RunStarted: lambda e: self._set_run(e, RunStatus.RUNNING, started_at=e.timestamp),
            Run.PatchProduced: self._patch_produced,
            Run.RunSucceeded: lambda e: self._set_run(
                e, RunStatus.SUCCEEDED, exit_code=e.exit_code, finished_at=e.timestamp
            ),
            Run.RunFailed: lambda e: self._set_run(
                e,
                RunStatus.FAILED,
                exit_code=e.exit_code,
                error={"code": e.code, "message": e.message},
                finished_at=e.timestamp,
            ),
            Run.RunCancelled: lambda e: self._set_run(
                e, RunStatus.CANCELLED, finished_at=e.timestamp
            ),
            Run.RunRequeued: self._run_requeued,
            Run.UsageRecorded: lambda e: self._set_run(e, None, usage=usage_view(e)),
        }
        self._position = 0

    def apply(self, position: int, event: Any) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            self._position = position
            handler(event)
        self.state.position = position
        self.state.events += 1
        self.state.last_timestamp = event.timestamp

    def _request_submitted(self, e: Request.RequestSubmitted) -> None:
        if e.originator_id in self.state.requests:
            return
        # Same columns, same order as the requests table.
        self.state.requests[e.originator_id] = {
            "id": e.originator_id,
            "status": "queued",
            "repo": e.repo,
            "ref": e.ref,
            "prompt": e.prompt,
            "agent": e.agent,
            "agent_options": copy.deepcopy(e.agent_options),
            "priority": e.priority,
            "timeout_s": e.timeout_s,
            "labels": dict(e.labels),
            "idempotency_key": e.idempotency_key,
            "created_at": e.timestamp,
            "updated_at": e.timestamp,
            "latest_run_id": e.first_run_id,
        }

    def _rerun_requested(self, e: Request.RerunRequested) -> None:
        row = self.state.requests.get(e.originator_id)
        if row is not None:
            row.update(latest_run_id=e.run_id, status="queued", updated_at=e.timestamp)

    def _run_queued(self, e: Run.RunQueued) -> None:
        if e.originator_id in self.state.runs:
            return
        # Same columns, same order as the runs table.
        self.state.runs[e.originator_id] = {
            "id": e.originator_id,
            "request_id": e.request_id,
            "number": e.number,
            "status": "queued",
            "agent": e.agent,
            "attempt": 0,
            "exit_code": None,
            "error": None,
            "queued_at": e.timestamp,
            "started_at": None,
            "finished_at": None,
            "patch": None,
            "usage": None,
            "diff": None,
        }

    def _patch_produced(self, e: Run.PatchProduced) -> None:
        summary = {
            "files_changed": e.files_changed,
            "insertions": e.insertions,
            "deletions": e.deletions,
            "bytes": e.bytes,
            "sha256": e.sha256,
        }
        self._set_run(e, None, patch=summary, diff=e.diff if self.keep_diffs else None)
        if e.originator_id in self.state.runs:
            self.state.patch_positions[e.originator_id] = self._position

    def _run_requeued(self, e: Run.RunRequeued) -> None:
        self._set_run(e, RunStatus.QUEUED, started_at=None, patch=None, diff=None)
        self.state.patch_positions.pop(e.originator_id, None)

    def _set_run(self, e: Any, status: RunStatus | None, **columns: Any) -> None:
        run = self.state.runs.get(e.originator_id)
        if run is None:
            return  # as an UPDATE of a missing row: nothing
        if status is not None:
            columns["status"] = status.value
        run.update(columns)
        request = self.state.requests.get(run["request_id"])
        if request is None:
            return
        request["updated_at"] = e.timestamp
        if status is not None and request["latest_run_id"] == e.originator_id:
            request["status"] = status.as_request_status()


def replay(
    app: Forgeline,
    *,
    position: int | None = None,
    as_of: datetime | None = None,
    keep_diffs: bool = False,
    batch_size: int = 2000,
    progress: Callable[[int], None] | None = None,
) -> ReplayState:
    """Every request and run after the event at `position`, or as of `as_of` (see the module
    docstring); the whole store when neither is given."""
    state = ReplayState()
    applier = MemoryApplier(state, keep_diffs=keep_diffs)
    for chunk in _chunks(app, stop=position, batch_size=batch_size):
        applied = _apply_until(applier, chunk, as_of)
        if progress is not None:
            progress(applied)
        if applied < len(chunk):
            break
    return state


def replay_request(
    app: Forgeline,
    conn: psycopg.Connection[Any],
    request_id: UUID,
    *,
    position: int | None = None,
    as_of: datetime | None = None,
    keep_diffs: bool = False,
) -> ReplayState:
    """The same, for one request and its runs only: reads just their events. With `as_of`, the
    prefix is that of the request's own events (the same moment unless writers' clocks
    disagree)."""
    state = ReplayState()
    events = load_request_events(app, conn, request_id) or []
    if position is not None:
        events = [(p, e) for p, e in events if p <= position]
    _apply_until(MemoryApplier(state, keep_diffs=keep_diffs), events, as_of)
    return state


def _apply_until(
    applier: MemoryApplier, events: Sequence[tuple[int, Any]], as_of: datetime | None
) -> int:
    for n, (position, event) in enumerate(events):
        if as_of is not None and event.timestamp > as_of:
            return n
        applier.apply(position, event)
    return len(events)


def _chunks(
    app: Forgeline, *, stop: int | None, batch_size: int
) -> Iterator[list[tuple[int, Any]]]:
    start = 0
    while True:
        notifications = app.recorder.select_notifications(
            start=start, limit=batch_size, stop=stop, inclusive_of_start=False
        )
        if not notifications:
            return
        yield [(n.id, app.mapper.to_domain_event(n)) for n in notifications]
        start = notifications[-1].id

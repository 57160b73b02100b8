"""Audit queries: a request's history straight from the event store, in commit order, and the
audit report built from it (who asked what, when, every transition, attempts, digests).

The report folds the events with the domain aggregates themselves, so the transitions it shows
are the ones the state machine made, not a second reading of the event names.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import StoredEvent
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from domain.application import EVENTS_TABLE, Forgeline, aggregate_name, event_data, event_type
from domain.request import Request
from domain.run import Run
from projections.apply import usage_view

_EVENTS = sql.Identifier(EVENTS_TABLE)
_SELECT = sql.SQL(
    "SELECT notification_id, originator_id, originator_version, topic, state"
    " FROM {e} WHERE originator_id = ANY(%s) ORDER BY notification_id"
).format(e=_EVENTS)

Positioned = tuple[int, Any]  # (store position, decoded domain event)


def _run_ids(request_events: Sequence[Positioned]) -> list[UUID] | None:
    """The runs a request's own events name; None when they are not a request's."""
    if not request_events or not isinstance(request_events[0][1], Request.RequestSubmitted):
        return None
    first: Request.RequestSubmitted = request_events[0][1]
    return [first.first_run_id] + [
        e.run_id for _, e in request_events if isinstance(e, Request.RerunRequested)
    ]


async def request_history(
    app: Forgeline, pool: AsyncConnectionPool[Any], request_id: UUID
) -> list[dict[str, Any]] | None:
    """The request's and its runs' events; None when the store holds no such request."""
    async with pool.connection() as conn:
        cur = await conn.execute(_SELECT, ([request_id],))
        own = [_decode(app, row) for row in await cur.fetchall()]
        run_ids = _run_ids(own)
        if run_ids is None:
            return None
        cur = await conn.execute(_SELECT, ([request_id, *run_ids],))
        rows = await cur.fetchall()
    return [history_entry(*_decode(app, row)) for row in rows]


def load_request_events(
    app: Forgeline, conn: psycopg.Connection[Any], request_id: UUID
) -> list[Positioned] | None:
    """The request's and its runs' decoded events in commit order; None when no such request."""
    own = [_decode(app, row) for row in conn.execute(_SELECT, ([request_id],)).fetchall()]
    run_ids = _run_ids(own)
    if run_ids is None:
        return None
    rows = conn.execute(_SELECT, ([request_id, *run_ids],)).fetchall()
    return [_decode(app, row) for row in rows]


def history_entry(position: int, event: Any) -> dict[str, Any]:
    """One event as the API's /v1/requests/{id}/events shows it."""
    return {
        "position": position,
        "aggregate": aggregate_name(event),
        "aggregate_id": str(event.originator_id),
        "version": event.originator_version,
        "type": event_type(event),
        "timestamp": event.timestamp.isoformat(),
        "data": event_data(event),
    }


def _decode(app: Forgeline, row: Sequence[Any]) -> Positioned:
    position, originator_id, version, topic, state = row
    stored = StoredEvent(
        originator_id=originator_id, originator_version=version, topic=topic, state=bytes(state)
    )
    return int(position), app.mapper.to_domain_event(stored)


# ------------------------------------------------------------------------------ the report


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _short(digest: str | None, n: int = 12) -> str:
    return (digest or "")[:n]


def _log(lines: int, sha256: str) -> str:
    return f"log {lines} lines, sha256 {_short(sha256)}" if sha256 else f"log {lines} lines"


def _by(data: dict[str, Any]) -> str:
    """Who asked (the API key's id, on events from v2 on) and the command that carried it."""
    parts = [f"command {data['command_id']}"] if data.get("command_id") else []
    for key in ("submitted_by", "requested_by"):
        if data.get(key):
            parts.insert(0, f"by {data[key]}")
    return ", ".join(parts)


def summary(event: Any) -> str:
    """One line saying what an event records, for a person."""
    d = event_data(event)
    match event:
        case Request.RequestSubmitted():
            text = (
                f"request submitted: agent {event.agent}, repo {event.repo} @ "
                f"{event.ref or 'HEAD'}, priority {event.priority}, timeout {event.timeout_s}s"
            )
            if event.labels:
                text += ", labels " + ", ".join(f"{k}={v}" for k, v in event.labels.items())
            if event.idempotency_key:
                text += f", idempotency key {event.idempotency_key}"
            return f"{text} ({_by(d)})"
        case Request.RerunRequested():
            prompt = "with a follow-up prompt" if event.prompt is not None else "same prompt"
            return f"rerun asked, {prompt}: run {event.run_id} ({_by(d)})"
        case Run.RunQueued():
            text = f"run #{event.number} queued (agent {event.agent}, timeout {event.timeout_s}s)"
            if event.base_run_id is not None:
                text += f", on top of the patch of run {event.base_run_id}"
            return text
        case Run.ProvisioningStarted():
            return f"attempt {event.attempt} claimed by worker {event.worker}"
        case Run.WorkspaceProvisioned():
            return f"workspace ready ({event.provisioner}), base commit {_short(event.base_commit)}"
        case Run.RunStarted():
            return "agent started"
        case Run.PatchProduced():
            return (
                f"patch: {event.files_changed} file(s), +{event.insertions} -{event.deletions},"
                f" {event.bytes} bytes, sha256 {event.sha256}"
            )
        case Run.RunSucceeded():
            return (
                f"succeeded, exit code {event.exit_code}; {_log(event.log_lines, event.log_sha256)}"
            )
        case Run.RunFailed():
            exit_code = ""
            if event.exit_code is not None and f"code {event.exit_code}" not in event.message:
                exit_code = f", exit code {event.exit_code}"
            log = _log(event.log_lines, event.log_sha256)
            return f"failed: {event.code}: {event.message}{exit_code}; {log}"
        case Run.CancelRequested():
            return f"cancel asked: {event.reason} ({_by(d)})"
        case Run.RunCancelled():
            return f"cancelled: {event.reason}; {_log(event.log_lines, event.log_sha256)}"
        case Run.RunRequeued():
            return f"requeued: {event.reason}"
    keys = ", ".join(sorted(d)) or "no data"
    return f"{event_type(event)} ({keys})"


def audit_report(request_id: UUID, events: Sequence[Positioned]) -> dict[str, Any]:
    """The whole story of a request: what was asked, every run with its attempts and digests,
    and a timeline of every event with the status transition it made."""
    requests: dict[UUID, Request] = {}
    runs: dict[UUID, Run] = {}
    run_info: dict[UUID, dict[str, Any]] = {}
    timeline: list[dict[str, Any]] = []
    request_info: dict[str, Any] = {"id": str(request_id)}
    for position, event in events:
        entry = history_entry(position, event)
        run_number: int | None = None
        before: str | None = None
        after: str | None = None
        if aggregate_name(event) == "Run":
            run = runs.get(event.originator_id)
            before = run.status.value if run is not None else None
            run = event.mutate(run)
            assert run is not None
            runs[run.id] = run
            after = run.status.value
            run_number = run.number
            _record_run(run_info, run, position, event)
        else:
            request = requests.get(event.originator_id)
            before = _request_status(request, runs)
            request = event.mutate(request)
            assert request is not None
            requests[request.id] = request
            after = "queued"  # a request's new latest run always starts queued
            if isinstance(event, Request.RequestSubmitted):
                request_info.update(_request_info(event))
        entry.update(
            {
                "run_number": run_number,
                "status_from": before,
                "status_to": after,
                "summary": summary(event),
            }
        )
        timeline.append(entry)
    request = requests.get(request_id)
    request_info["status"] = _request_status(request, runs)
    request_info["latest_run_id"] = str(request.latest_run_id) if request else None
    request_info["updated_at"] = timeline[-1]["timestamp"] if timeline else None
    ordered = sorted(run_info.values(), key=lambda r: int(r["number"]))
    return {"request": request_info, "runs": ordered, "timeline": timeline}


def _request_status(request: Request | None, runs: dict[UUID, Run]) -> str | None:
    if request is None:
        return None
    latest = runs.get(request.latest_run_id)
    return latest.status.as_request_status() if latest is not None else "queued"


def _request_info(event: Request.RequestSubmitted) -> dict[str, Any]:
    return {
        "repo": event.repo,
        "ref": event.ref,
        "prompt": event.prompt,
        "agent": event.agent,
        "agent_options": event.agent_options,
        "priority": event.priority,
        "timeout_s": event.timeout_s,
        "labels": event.labels,
        "idempotency_key": event.idempotency_key,
        "submitted_by": getattr(event, "submitted_by", None),
        "command_id": event.command_id,
        "submitted_at": event.timestamp.isoformat(),
    }


def _record_run(info: dict[UUID, dict[str, Any]], run: Run, position: int, event: Any) -> None:
    """Keeps the run's summary: attempts (claim, workspace, start, how each ended), the patch
    and log digests, the error, a cancel asked for."""
    if isinstance(event, Run.RunQueued):
        info[run.id] = {
            "id": str(run.id),
            "number": run.number,
            "agent": run.agent,
            "prompt": run.prompt,
            "base_run_id": str(run.base_run_id) if run.base_run_id else None,
            "queued_at": event.timestamp.isoformat(),
            "status": run.status.value,
            "attempts": [],
            "exit_code": None,
            "error": None,
            "patch": None,
            "log": None,
            "cancel": None,
            "finished_at": None,
            "usage": None,
        }
        return
    r = info[run.id]
    r["status"] = run.status.value
    attempts: list[dict[str, Any]] = r["attempts"]
    current = attempts[-1] if attempts else None
    at = event.timestamp.isoformat()
    match event:
        case Run.ProvisioningStarted():
            attempts.append(
                {
                    "attempt": event.attempt,
                    "worker": event.worker,
                    "claimed_at": at,
                    "provisioner": None,
                    "base_commit": None,
                    "started_at": None,
                    "ended_at": None,
                    "outcome": None,
                }
            )
        case Run.WorkspaceProvisioned() if current is not None:
            current.update(provisioner=event.provisioner, base_commit=event.base_commit)
        case Run.RunStarted() if current is not None:
            current["started_at"] = at
        case Run.PatchProduced():
            r["patch"] = {
                "sha256": event.sha256,
                "bytes": event.bytes,
                "files_changed": event.files_changed,
                "insertions": event.insertions,
                "deletions": event.deletions,
                "position": position,
            }
        case Run.RunRequeued():
            r["patch"] = None  # the lost attempt's patch is gone with it
            if current is not None:
                current.update(ended_at=at, outcome=f"requeued: {event.reason}")
        case Run.CancelRequested():
            r["cancel"] = {
                "reason": event.reason,
                "requested_by": getattr(event, "requested_by", None),
                "command_id": event.command_id,
                "asked_at": at,
            }
        case Run.UsageRecorded():
            r["usage"] = usage_view(event)
        case Run.RunSucceeded() | Run.RunFailed() | Run.RunCancelled():
            r["finished_at"] = at
            r["log"] = {"lines": event.log_lines, "sha256": event.log_sha256}
            if isinstance(event, Run.RunSucceeded | Run.RunFailed):
                r["exit_code"] = event.exit_code
            if isinstance(event, Run.RunFailed):
                r["error"] = {"code": event.code, "message": event.message}
            if current is not None:
                current.update(ended_at=at, outcome=run.status.value)

"""Projects: a key limited to projects sees and acts only on requests whose `project` label is
one of them.

- Submitting needs `labels.project` among the key's projects: else 403.
- A request (or run, patch, log, events) of another project, or of none, answers 404, exactly
  as a request that does not exist: a scoped key learns nothing of other projects' requests,
  not even that they exist. Rerun and cancel of such a request are 404 too.
- The list shows only the key's projects.

Keys without projects (and admin keys, which never have any) see everything.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg.rows import dict_row
from starlette.requests import Request

from gateway._http import deps
from gateway.auth import current_key
from gateway.errors import ApiError, not_found
from projections.schema import LIVE_PREFIX, tables

# The read model's own shaping and cursors: a scoped list must page exactly like the full one.
from projections.views import _decode_cursor, _encode_cursor, _request_view

PROJECT_LABEL = "project"

_REQUESTS, _RUNS = tables(LIVE_PREFIX)


def check_submit(request: Request, labels: dict[str, str]) -> None:
    key = current_key(request)
    if not key.scoped:
        return
    project = labels.get(PROJECT_LABEL)
    if project is None or project not in key.projects:
        allowed = ", ".join(key.projects)
        raise ApiError(
            403,
            "forbidden_project",
            f"the key {key.id} may submit only with the label {PROJECT_LABEL} set to one of: "
            f"{allowed}",
            details=[{"field": f"labels.{PROJECT_LABEL}", "allowed": list(key.projects)}],
        )


async def _project(request: Request, query: sql.Composable, ident: UUID) -> tuple[bool, Any]:
    async with deps(request).pool.connection() as conn:
        cur = await conn.execute(query, (ident,))
        row = await cur.fetchone()
    return (row is not None, row[0] if row is not None else None)


async def check_request(request: Request, request_id: UUID) -> None:
    """404 unless the key may see this request (no query at all for an unscoped key)."""
    key = current_key(request)
    if not key.scoped:
        return
    found, project = await _project(
        request,
        sql.SQL("SELECT labels->>{p} FROM {r} WHERE id = %s").format(
            p=sql.Literal(PROJECT_LABEL), r=_REQUESTS
        ),
        request_id,
    )
    if not found or not key.may_see(project):
        raise not_found("request", str(request_id))


async def check_run(request: Request, run_id: UUID) -> None:
    """404 unless the key may see the request of this run."""
    key = current_key(request)
    if not key.scoped:
        return
    found, project = await _project(
        request,
        sql.SQL(
            "SELECT r.labels->>{p} FROM {u} u JOIN {r} r ON r.id = u.request_id WHERE u.id = %s"
        ).format(p=sql.Literal(PROJECT_LABEL), u=_RUNS, r=_REQUESTS),
        run_id,
    )
    if not found or not key.may_see(project):
        raise not_found("run", str(run_id))


def may_see_history(request: Request, history: list[dict[str, Any]]) -> bool:
    """Whether the key may see a request's events (they hold its labels: the store is read
    directly, the read model may not have the request yet)."""
    key = current_key(request)
    if not key.scoped:
        return True
    for event in history:
        if event.get("type") == "RequestSubmitted":
            labels = event.get("data", {}).get("labels") or {}
            return key.may_see(labels.get(PROJECT_LABEL))
    return False


async def list_requests(
    request: Request,
    *,
    projects: tuple[str, ...],
    status: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Views.list_requests with only the requests of these projects: newest first, the same
    items and cursors as the full list, minus the others."""
    conditions: list[sql.Composable] = [
        sql.SQL("labels->>{p} = ANY(%s)").format(p=sql.Literal(PROJECT_LABEL))
    ]
    params: list[Any] = [list(projects)]
    if status is not None:
        conditions.append(sql.SQL("status = %s"))
        params.append(status)
    if cursor is not None:
        created_at, last_id = _decode_cursor(cursor)
        conditions.append(sql.SQL("(created_at, id) < (%s, %s)"))
        params.extend([created_at, last_id])
    query = sql.SQL(
        "SELECT * FROM {r} WHERE {w} ORDER BY created_at DESC, id DESC LIMIT %s"
    ).format(r=_REQUESTS, w=sql.SQL(" AND ").join(conditions))
    async with deps(request).pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, (*params, limit + 1))
        rows = await cur.fetchall()
    page, more = rows[:limit], len(rows) > limit
    next_cursor = _encode_cursor(page[-1]["created_at"], page[-1]["id"]) if more else None
    return [_request_view(row, []) for row in page], next_cursor

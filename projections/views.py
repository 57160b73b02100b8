"""Read queries for the gateway: plain SELECTs over the read tables, shaped as the API shows."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from projections import queue
from projections.schema import LIVE_PREFIX, tables

_REQUESTS, _RUNS = tables(LIVE_PREFIX)

_RUN_COLUMNS = sql.SQL(
    "id, request_id, number, status, agent, attempt, exit_code, error,"
    " queued_at, started_at, finished_at, patch, usage"
)


class InvalidCursor(ValueError):
    pass


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _run_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "request_id": str(row["request_id"]),
        "number": row["number"],
        "status": row["status"],
        "agent": row["agent"],
        "attempt": row["attempt"],
        "exit_code": row["exit_code"],
        "error": row["error"],
        "queued_at": _iso(row["queued_at"]),
        "started_at": _iso(row["started_at"]),
        "finished_at": _iso(row["finished_at"]),
        "patch": row["patch"],
        "usage": row["usage"],
    }


def _request_view(row: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "status": row["status"],
        "repo": row["repo"],
        "ref": row["ref"],
        "prompt": row["prompt"],
        "agent": row["agent"],
        "priority": row["priority"],
        "labels": row["labels"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "latest_run_id": str(row["latest_run_id"]),
        "runs": runs,
    }


class Views:
    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def _all(self, query: sql.Composable, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params)
            rows: list[dict[str, Any]] = await cur.fetchall()
            return rows

    async def _one(self, query: sql.Composable, params: tuple[Any, ...]) -> dict[str, Any] | None:
        rows = await self._all(query, params)
        return rows[0] if rows else None

    async def get_request(self, request_id: UUID) -> dict[str, Any] | None:
        row = await self._one(
            sql.SQL("SELECT * FROM {r} WHERE id = %s").format(r=_REQUESTS), (request_id,)
        )
        if row is None:
            return None
        runs = await self._all(
            sql.SQL("SELECT {c} FROM {u} WHERE request_id = %s ORDER BY number").format(
                c=_RUN_COLUMNS, u=_RUNS
            ),
            (request_id,),
        )
        return _request_view(row, [_run_view(run) for run in runs])

    async def list_requests(
        self, *, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; the cursor is the (created_at, id) of the last item of a page."""
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        if status is not None:
            conditions.append(sql.SQL("status = %s"))
            params.append(status)
        if cursor is not None:
            created_at, last_id = _decode_cursor(cursor)
            conditions.append(sql.SQL("(created_at, id) < (%s, %s)"))
            params.extend([created_at, last_id])
        where = (
            sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        )
        rows = await self._all(
            sql.SQL("SELECT * FROM {r}{w} ORDER BY created_at DESC, id DESC LIMIT %s").format(
                r=_REQUESTS, w=where
            ),
            (*params, limit + 1),
        )
        page, more = rows[:limit], len(rows) > limit
        next_cursor = _encode_cursor(page[-1]["created_at"], page[-1]["id"]) if more else None
        return [_request_view(row, []) for row in page], next_cursor

    async def get_run(self, run_id: UUID) -> dict[str, Any] | None:
        row = await self._one(
            sql.SQL("SELECT {c} FROM {u} WHERE id = %s").format(c=_RUN_COLUMNS, u=_RUNS), (run_id,)
        )
        if row is None:
            return None
        view = _run_view(row)
        view["queue_position"] = (
            await queue.position(self._pool, run_id) if view["status"] == "queued" else None
        )
        return view

    async def get_run_diff(self, run_id: UUID) -> str | None:
        row = await self._one(
            sql.SQL("SELECT diff FROM {u} WHERE id = %s").format(u=_RUNS), (run_id,)
        )
        return row["diff"] if row else None

    async def latest_run_status(self, request_id: UUID) -> str | None:
        row = await self._one(
            sql.SQL(
                "SELECT u.status FROM {r} r JOIN {u} u ON u.id = r.latest_run_id WHERE r.id = %s"
            ).format(r=_REQUESTS, u=_RUNS),
            (request_id,),
        )
        return row["status"] if row else None


def _encode_cursor(created_at: datetime, last_id: UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(last_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, last_id = json.loads(raw)
        return datetime.fromisoformat(created_at), UUID(last_id)
    except (ValueError, TypeError) as exc:
        raise InvalidCursor("cursor is not one this API returned") from exc

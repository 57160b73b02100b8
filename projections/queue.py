"""Reading the run queue the workers pick from (its table and order are handlers/scheduling.py's):
a queued run's position, and how many runs wait.

The position comes from the view `forgeline_run_queue_order`, the very order picks follow, so
the run at position 1 is the next one a free slot takes (a run waiting out a retry backoff
keeps its place but is skipped until it is due).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg_pool import AsyncConnectionPool

QUEUE_TABLE = "forgeline_run_queue"  # made by the workers (handlers/scheduling.py)
QUEUE_ORDER_VIEW = "forgeline_run_queue_order"


async def _exists(conn: Any) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (QUEUE_ORDER_VIEW,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def position(pool: AsyncConnectionPool[Any], run_id: UUID) -> int | None:
    """1 for the next run to start; None when the run has no place (not queued, being
    started, or no worker ever ran against this database)."""
    async with pool.connection() as conn:
        if not await _exists(conn):
            return None
        cur = await conn.execute(
            sql.SQL("SELECT position FROM {v} WHERE run_id = %s").format(
                v=sql.Identifier(QUEUE_ORDER_VIEW)
            ),
            (run_id,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else None


async def depth(pool: AsyncConnectionPool[Any]) -> int:
    """Runs waiting in the queue (none started)."""
    async with pool.connection() as conn:
        if not await _exists(conn):
            return 0
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {q} WHERE claimed_by IS NULL").format(
                q=sql.Identifier(QUEUE_TABLE)
            )
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

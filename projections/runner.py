"""The projection runner: follows the store's notification log and keeps the read tables.

Each batch of events and the runner's new position are written in one transaction, and the
position only moves from the value this runner read: a batch is applied exactly once, even
with two runners racing (the loser rolls back and reads again).

It looks at the store again when `idle` (given by the composition root: a wait for the LISTEN
wake-ups of forgeline/store_wakeups.py, with a slow poll as a fallback) returns; without it, it
polls every `idle_wait_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import anyio
import psycopg
from psycopg import sql

from domain.application import Forgeline
from projections.apply import Applier
from projections.schema import (
    LIVE_PREFIX,
    POSITIONS_TABLE,
    SCHEMA_LOCK_KEY,
    create_statements,
    drop_statements,
)

log = logging.getLogger(__name__)

_POSITIONS = sql.Identifier(POSITIONS_TABLE)


class PositionMoved(Exception):
    """Another runner applied this batch first."""


class ProjectionRunner:
    def __init__(
        self,
        app: Forgeline,
        conninfo: str,
        *,
        prefix: str = LIVE_PREFIX,
        batch_size: int = 500,
        idle_wait_s: float = 0.02,
        idle: Callable[[asyncio.Event], Awaitable[None]] | None = None,
    ) -> None:
        self._app = app
        self._conninfo = conninfo
        self._prefix = prefix
        self._name = f"{prefix}tables"
        self._applier = Applier(prefix)
        self._batch_size = batch_size
        self._idle_wait_s = idle_wait_s
        self._idle = idle
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._conninfo)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def create_tables(self) -> None:
        conn = self._connection()
        with conn.transaction():
            # Serialises schema creation with other processes starting at the same time.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            for statement in create_statements(self._prefix):
                conn.execute(statement)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {p} (name, position) VALUES (%s, 0) ON CONFLICT DO NOTHING"
                ).format(p=_POSITIONS),
                (self._name,),
            )

    def position(self) -> int:
        row = (
            self._connection()
            .execute(
                sql.SQL("SELECT position FROM {p} WHERE name = %s").format(p=_POSITIONS),
                (self._name,),
            )
            .fetchone()
        )
        self._connection().commit()
        return int(row[0]) if row else 0  # type: ignore[call-overload]

    def process_batch(self) -> int:
        """Applies the next batch of events; returns how many it applied."""
        start = self.position()
        notifications = self._app.recorder.select_notifications(
            start=start, limit=self._batch_size, inclusive_of_start=False
        )
        if not notifications:
            return 0
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            # The row lock a swap of rebuilt tables takes too (projections/rebuild.py): no swap
            # happens while a batch is applied, and a batch that waited for a swap reads the
            # swapped-in tables' position here and starts again from it.
            cur.execute(
                sql.SQL("SELECT position FROM {p} WHERE name = %s FOR UPDATE").format(p=_POSITIONS),
                (self._name,),
            )
            row = cur.fetchone()
            if row is None or row[0] != start:
                raise PositionMoved(f"{self._name}: position moved past {start}")
            with conn.pipeline():  # statements go out without waiting for each answer: ~3x
                for notification in notifications:
                    self._applier.apply(cur, self._app.mapper.to_domain_event(notification))
            cur.execute(
                sql.SQL("UPDATE {p} SET position = %s WHERE name = %s AND position = %s").format(
                    p=_POSITIONS
                ),
                (notifications[-1].id, self._name, start),
            )
            if cur.rowcount != 1:
                raise PositionMoved(f"{self._name}: position moved past {start}")
        return len(notifications)

    def catch_up(self, progress: Callable[[int], None] | None = None) -> int:
        """Applies batches until none is left; returns how many events it applied."""
        total = 0
        while applied := self.process_batch():
            total += applied
            if progress is not None:
                progress(applied)
        return total

    def rebuild(self, progress: Callable[[int], None] | None = None) -> int:
        """Drops this runner's tables and replays the whole store into them from position 0."""
        conn = self._connection()
        with conn.transaction():
            for statement in drop_statements(self._prefix):
                conn.execute(statement)
            conn.execute(
                sql.SQL("DELETE FROM {p} WHERE name = %s").format(p=_POSITIONS), (self._name,)
            )
        self.create_tables()
        return self.catch_up(progress)

    async def run(self, stop: asyncio.Event) -> None:
        """Keeps the tables up to date until stop is set; errors are logged and retried."""
        await anyio.to_thread.run_sync(self.create_tables)
        while not stop.is_set():
            try:
                applied = await anyio.to_thread.run_sync(self.process_batch)
            except PositionMoved:
                continue
            except Exception:
                log.exception("projector: batch failed; retrying in 1 s")
                with contextlib.suppress(Exception):
                    self.close()
                applied = 0
                await _wait(stop, 1.0)
                continue
            if not applied:
                if self._idle is not None:
                    await self._idle(stop)
                else:
                    await _wait(stop, self._idle_wait_s)
        self.close()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

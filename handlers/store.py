"""Deciding against the store: decide, save; on a concurrent write, reload and decide again.

eventsourcing's API is synchronous, so every call here runs in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar
from uuid import UUID

import anyio
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError
from eventsourcing.postgres import PostgresAggregateRecorder
from eventsourcing.utils import retry
from psycopg.sql import SQL, Identifier

from domain.application import Forgeline
from domain.run import Run

T = TypeVar("T")

MAX_DECISION_ATTEMPTS = 10


def decide_on_run(
    app: Forgeline, run_id: UUID, decide: Callable[[Run], T], *, held: Run | None = None
) -> T:
    """Runs decide on a fresh Run and saves what it recorded, re-deciding when another
    writer saved first (IntegrityError); domain errors from decide propagate unchanged."""
    return decide_and_hold(app, run_id, decide, held=held)[0]


def decide_and_hold(
    app: Forgeline, run_id: UUID, decide: Callable[[Run], T], *, held: Run | None = None
) -> tuple[T, Run]:
    """decide_on_run, first on `held` (a Run this caller loaded or saved earlier) instead of
        a fresh load; returns decide's result and the Run as saved, to hold for the next decision.

        Deciding on a held Run is as safe as on a fresh one: its events are saved at the next
        versions, so the save fails (IntegrityError) if anyone else wrote since it was held; then,
        and when decide refuses (the held Run may be behind the store), it is decided again on
        a fresh Run. The held Run is used up either way (when the call fails it may hold events
    that were never saved: deciding on it again could save them past a rival's), and one caller
    decides on it at a time."""
    if held is not None:
        try:
            result = decide(held)
        except Exception:
            pass  # the held Run may be behind the store: decided again on a fresh one
        else:
            try:
                app.save(held)
            except IntegrityError:
                pass  # another writer saved first
            else:
                return result, held
    for _ in range(MAX_DECISION_ATTEMPTS):
        run = app.get_run(run_id)
        result = decide(run)
        try:
            app.save(run)
        except IntegrityError:
            continue
        return result, run
    raise RuntimeError(f"run {run_id}: {MAX_DECISION_ATTEMPTS} concurrent writes in a row")


async def decide_on_run_async(app: Forgeline, run_id: UUID, decide: Callable[[Run], T]) -> T:
    return await anyio.to_thread.run_sync(decide_on_run, app, run_id, decide)


async def decide_and_hold_async(
    app: Forgeline, run_id: UUID, decide: Callable[[Run], T], *, held: Run | None
) -> tuple[T, Run]:
    return await anyio.to_thread.run_sync(lambda: decide_and_hold(app, run_id, decide, held=held))


async def load_run(app: Forgeline, run_id: UUID) -> Run:
    return await anyio.to_thread.run_sync(app.get_run, run_id)


@retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)  # as the library's reads
def stored_ids(app: Forgeline, aggregate_ids: Sequence[UUID]) -> set[UUID]:
    """Which of these ids have events in the store: one indexed query on Postgres (the
    primary key starts with originator_id); per id on any other recorder (tests' in-memory)."""
    recorder = app.recorder
    if isinstance(recorder, PostgresAggregateRecorder):
        query = SQL(
            "SELECT DISTINCT originator_id FROM {schema}.{table} WHERE originator_id = ANY(%s)"
        ).format(
            schema=Identifier(recorder.datastore.schema),
            table=Identifier(recorder.events_table_name),
        )
        with recorder.datastore.get_connection() as conn, conn.cursor() as cursor:
            cursor.execute(query, (list(aggregate_ids),), prepare=True)
            return {UUID(str(row["originator_id"])) for row in cursor.fetchall()}
    return {i for i in aggregate_ids if recorder.select_events(i, limit=1)}

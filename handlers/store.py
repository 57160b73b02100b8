"""Deciding against the store: load, decide, save; on a concurrent write, reload and decide again.

eventsourcing's API is synchronous, so every call here runs in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from uuid import UUID

import anyio
from eventsourcing.persistence import IntegrityError

from domain.application import Forgeline
from domain.run import Run

T = TypeVar("T")

MAX_DECISION_ATTEMPTS = 10


def decide_on_run(app: Forgeline, run_id: UUID, decide: Callable[[Run], T]) -> T:
    """Runs decide on a fresh Run and saves what it recorded, re-deciding when another
    writer saved first (IntegrityError); domain errors from decide propagate unchanged."""
    for _ in range(MAX_DECISION_ATTEMPTS):
        run = app.get_run(run_id)
        result = decide(run)
        try:
            app.save(run)
        except IntegrityError:
            continue
        return result
    raise RuntimeError(f"run {run_id}: {MAX_DECISION_ATTEMPTS} concurrent writes in a row")


async def decide_on_run_async(app: Forgeline, run_id: UUID, decide: Callable[[Run], T]) -> T:
    return await anyio.to_thread.run_sync(decide_on_run, app, run_id, decide)


async def load_run(app: Forgeline, run_id: UUID) -> Run:
    return await anyio.to_thread.run_sync(app.get_run, run_id)

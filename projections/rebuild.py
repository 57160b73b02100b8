"""Rebuild a projection from position 0 into fresh tables, then swap them in atomically, while
the API keeps reading and the live projector keeps running.

1. Fresh tables under a prefix of their own are filled from position 0 by an ordinary
   ProjectionRunner (its own position row), as far as the store goes.
2. The swap, one transaction: take the schema advisory lock, then the live projector's
   position row FOR UPDATE -- the lock every live batch takes first (runner.process_batch), so
   no batch is half-applied and none starts -- apply to the fresh tables whatever was stored
   since step 1, drop the live tables, rename the fresh ones (and their indexes) to the live
   names, and set the live position row to the fresh tables' position.
3. A live batch that waited on the row lock reads the new position, finds it is not the one it
   started from and starts again from there (PositionMoved, nothing applied): every event is
   applied to the swapped-in tables exactly once.

Readers (the gateway) wait only for the swap transaction itself, then see the new tables; they
never see a position older than the one they saw before, because the swap first brings the
fresh tables at least to the live position. The swap waits at most `lock_timeout_s` for a lock
(a long reader, a stuck batch) and is then tried again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from eventsourcing.persistence import StoredEvent
from psycopg import errors, sql
from psycopg.types.json import Jsonb

from domain.application import EVENTS_TABLE, Forgeline
from domain.run import Run
from projections.apply import Applier, projectable
from projections.replay import replay
from projections.runner import ProjectionRunner
from projections.schema import LIVE_PREFIX, POSITIONS_TABLE, SCHEMA_LOCK_KEY, tables

log = logging.getLogger(__name__)

# Projection name -> the prefix of its live tables. One set of read tables so far.
PROJECTIONS: dict[str, str] = {"views": LIVE_PREFIX}
FRESH_PREFIX = "forgeline_rebuild_"
# Held (session-level) for a whole rebuild: one at a time, and leftovers of a crashed one are
# then safe to drop.
REBUILD_LOCK_KEY = 0x464F52474532

_POSITIONS = sql.Identifier(POSITIONS_TABLE)


class RebuildError(RuntimeError):
    pass


@dataclass
class RebuildResult:
    name: str
    events: int  # events applied to the fresh tables, in all
    position: int  # the swapped-in tables' position
    seconds: float
    swap_seconds: float  # how long the swap transaction held the locks
    swap_attempts: int


def rebuild_and_swap(
    app: Forgeline,
    conninfo: str,
    name: str = "views",
    *,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 1000,
    lock_timeout_s: float = 5.0,
    attempts: int = 10,
    bulk: bool = True,
) -> RebuildResult:
    """Rebuilds projection `name` from position 0 into fresh tables and swaps them in (see the
    module docstring). bulk: fill the fresh tables by folding the store in memory
    (projections/replay.py) and COPYing the rows in, about 3x faster than applying every event
    as SQL (bulk=False); what is stored meanwhile is applied as SQL either way."""
    if name not in PROJECTIONS:
        raise RebuildError(f"no projection named {name!r} (known: {', '.join(PROJECTIONS)})")
    live_prefix = PROJECTIONS[name]
    started = time.perf_counter()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (REBUILD_LOCK_KEY,)).fetchone()
        if not row or not row[0]:
            raise RebuildError("another rebuild is running; try again when it has finished")
        try:
            drop_leftovers(conn)
            fresh_prefix = f"{FRESH_PREFIX}{secrets.token_hex(4)}_"
            runner = ProjectionRunner(app, conninfo, prefix=fresh_prefix, batch_size=batch_size)
            try:
                runner.create_tables()
                if bulk:
                    applied = _bulk_load(app, conn, fresh_prefix, batch_size, progress)
                else:
                    applied = runner.catch_up(progress)
                for attempt in range(1, attempts + 1):
                    applied += runner.catch_up(progress)  # what came in meanwhile
                    try:
                        swap_started = time.perf_counter()
                        position, tail = _swap(
                            conn, app, fresh_prefix, live_prefix, batch_size, lock_timeout_s
                        )
                    except (errors.LockNotAvailable, errors.DeadlockDetected) as exc:
                        log.warning("rebuild %s: swap attempt %d: %s", name, attempt, exc)
                        continue
                    if progress is not None and tail:
                        progress(tail)
                    return RebuildResult(
                        name=name,
                        events=applied + tail,
                        position=position,
                        seconds=time.perf_counter() - started,
                        swap_seconds=time.perf_counter() - swap_started,
                        swap_attempts=attempt,
                    )
                raise RebuildError(
                    f"could not swap the rebuilt tables in after {attempts} attempts (a lock "
                    f"was held longer than {lock_timeout_s}s each time)"
                )
            finally:
                runner.close()
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                drop_leftovers(conn)
            raise
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (REBUILD_LOCK_KEY,))


_REQUEST_COLUMNS = (
    "id, status, repo, ref, prompt, agent, agent_options, priority, timeout_s, labels,"
    " idempotency_key, created_at, updated_at, latest_run_id"
)
_RUN_COLUMNS = (
    "id, request_id, number, status, agent, attempt, exit_code, error, queued_at, started_at,"
    " finished_at, patch, usage, diff"
)
_JSON_COLUMNS = frozenset({"agent_options", "labels", "error", "patch", "usage"})


def _bulk_load(
    app: Forgeline,
    conn: psycopg.Connection[Any],
    fresh_prefix: str,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Fills the fresh, empty tables with the whole store folded in memory (the rows
    projections/apply.py would have made), COPYed in with their position in one transaction;
    diffs are read back from their PatchProduced events a chunk of runs at a time."""
    state = replay(app, keep_diffs=False, batch_size=max(batch_size, 2000), progress=progress)
    requests, runs = tables(fresh_prefix)
    with conn.transaction(), conn.cursor() as cur:
        copy_requests = sql.SQL("COPY {} ({}) FROM STDIN").format(
            requests, sql.SQL(_REQUEST_COLUMNS)
        )
        with cur.copy(copy_requests) as copy:
            for row in state.requests.values():
                copy.write_row(_copy_values(row))
        run_rows = list(state.runs.values())
        copy_runs = sql.SQL("COPY {} ({}) FROM STDIN").format(runs, sql.SQL(_RUN_COLUMNS))
        for first in range(0, len(run_rows), 500):
            chunk = run_rows[first : first + 500]
            diffs = _diffs(
                app,
                conn,
                [state.patch_positions[r["id"]] for r in chunk if r["id"] in state.patch_positions],
            )
            with cur.copy(copy_runs) as copy:
                for row in chunk:
                    position = state.patch_positions.get(row["id"])
                    values = {**row, "diff": diffs[position] if position is not None else None}
                    copy.write_row(_copy_values(values))
        cur.execute(
            sql.SQL("UPDATE {p} SET position = %s WHERE name = %s AND position = 0").format(
                p=_POSITIONS
            ),
            (state.position, f"{fresh_prefix}tables"),
        )
        if cur.rowcount != 1:
            raise RebuildError(f"the position row of {fresh_prefix}tables moved during the load")
    return state.events


def _copy_values(row: dict[str, Any]) -> list[Any]:
    values = [projectable(v) for v in row.values()]  # no U+0000 (projections/apply.py)
    return [
        Jsonb(v) if k in _JSON_COLUMNS and v is not None else v
        for k, v in zip(row, values, strict=True)
    ]


def _diffs(app: Forgeline, conn: psycopg.Connection[Any], positions: list[int]) -> dict[int, str]:
    """The diff of the PatchProduced event at each position."""
    if not positions:
        return {}
    rows = conn.execute(
        sql.SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state"
            " FROM {} WHERE notification_id = ANY(%s)"
        ).format(sql.Identifier(EVENTS_TABLE)),
        (positions,),
    ).fetchall()
    diffs = {}
    for position, originator_id, version, topic, state in rows:
        event = app.mapper.to_domain_event(
            StoredEvent(
                originator_id=originator_id,
                originator_version=version,
                topic=topic,
                state=bytes(state),
            )
        )
        assert isinstance(event, Run.PatchProduced), event
        diffs[int(position)] = event.diff
    return diffs


def drop_leftovers(conn: psycopg.Connection[Any]) -> list[str]:
    """Drops the fresh tables (and position rows) of rebuilds that did not swap."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        names = [
            str(r[0])
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r'"
                " AND c.relnamespace = current_schema()::regnamespace AND c.relname LIKE %s",
                (FRESH_PREFIX.replace("_", r"\_") + "%",),
            ).fetchall()
        ]
        for table in names:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        if conn.execute("SELECT to_regclass(%s)", (POSITIONS_TABLE,)).fetchone() != (None,):
            conn.execute(
                sql.SQL("DELETE FROM {p} WHERE name LIKE %s").format(p=_POSITIONS),
                (FRESH_PREFIX.replace("_", r"\_") + "%",),
            )
    return names


def _swap(
    conn: psycopg.Connection[Any],
    app: Forgeline,
    fresh_prefix: str,
    live_prefix: str,
    batch_size: int,
    lock_timeout_s: float,
) -> tuple[int, int]:
    """The swap transaction; returns (the swapped-in position, events applied in it)."""
    fresh_name, live_name = f"{fresh_prefix}tables", f"{live_prefix}tables"
    applier = Applier(fresh_prefix)
    tail = 0
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_s * 1000:.0f}",)
        )
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        # The live projector's lock: waits for a batch being applied, holds off the next one.
        cur.execute(
            sql.SQL("SELECT position FROM {p} WHERE name = %s FOR UPDATE").format(p=_POSITIONS),
            (live_name,),
        )
        cur.execute(
            sql.SQL("SELECT position FROM {p} WHERE name = %s FOR UPDATE").format(p=_POSITIONS),
            (fresh_name,),
        )
        row = cur.fetchone()
        if row is None:
            raise RebuildError(f"the position row of {fresh_name} is gone")
        position = int(row[0])
        # Whatever was stored since the last catch-up (committed events only, in order).
        while notifications := app.recorder.select_notifications(
            start=position, limit=batch_size, inclusive_of_start=False
        ):
            with conn.pipeline():
                for notification in notifications:
                    applier.apply(cur, app.mapper.to_domain_event(notification))
            position = notifications[-1].id
            tail += len(notifications)
        for fresh, live in zip(tables(fresh_prefix), tables(live_prefix), strict=True):
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(live))
            cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(fresh, live))
        _rename_indexes(cur, fresh_prefix, live_prefix)
        cur.execute(
            sql.SQL(
                "INSERT INTO {p} (name, position) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position"
            ).format(p=_POSITIONS),
            (live_name, position),
        )
        cur.execute(sql.SQL("DELETE FROM {p} WHERE name = %s").format(p=_POSITIONS), (fresh_name,))
    return position, tail


def _rename_indexes(cur: psycopg.Cursor[Any], fresh_prefix: str, live_prefix: str) -> None:
    """The renamed tables' indexes (and primary key constraints) get the live names, so that
    CREATE INDEX IF NOT EXISTS at the next start finds them."""
    live_tables = [f"{live_prefix}requests", f"{live_prefix}runs"]
    cur.execute(
        "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " JOIN pg_class t ON t.oid = x.indrelid"
        " WHERE t.relname = ANY(%s) AND t.relnamespace = current_schema()::regnamespace",
        (live_tables,),
    )
    for (index,) in cur.fetchall():
        if str(index).startswith(fresh_prefix):
            new = live_prefix + str(index)[len(fresh_prefix) :]
            cur.execute(
                sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                    sql.Identifier(index), sql.Identifier(new)
                )
            )


def count_events(conninfo: str) -> int:
    """How many events a rebuild from 0 will apply (for a progress bar's total)."""
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(EVENTS_TABLE))
        ).fetchone()
    return int(row[0]) if row else 0

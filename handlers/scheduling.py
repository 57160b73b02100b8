"""The run queue in Postgres: which queued run starts next, and who holds each started one.

JetStream delivers RunQueued events in the order they were recorded, so it cannot honour
priorities: the executor turns each trigger into a row of `forgeline_run_queue` (its ack
waits for the commit) and every worker picks from the table. A pick takes the next unclaimed
row in the order of the view `forgeline_run_queue_order`:

  priority (1 first), then the row's rank within its fairness key (the first queued run of
  each project, then the second of each, ...), then the key served longest ago first (a
  pick stamps its key in `forgeline_run_queue_turns`), then queue order. So projects take
  turns: one with a hundred queued runs and one with two alternate, and a newcomer goes next.

Picks are serialised by a transaction-level advisory lock, which also makes the global
concurrency limit (claimed rows across every worker process) exact. A claimed row holds a
lease that its worker renews (heartbeats); a row whose lease expired belongs to a worker
that is gone, and any worker recovers it (handlers/recovery.py). The gateway reads
`queue_position` from the same view (projections/views.py), so the position shown is the
order in which runs are picked.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg_pool import AsyncConnectionPool

QUEUE_TABLE = "forgeline_run_queue"
QUEUE_ORDER_VIEW = "forgeline_run_queue_order"
QUEUE_TURNS_TABLE = "forgeline_run_queue_turns"
# Serialises picks (global limit) and schema creation of the queue across processes.
QUEUE_LOCK_KEY = 0x464C51554555

# For the pool of a RunQueue: commits need not wait for the disk, but for enqueue (above).
# A claim, renewal, release or removal lost in a crash of Postgres is repaired by the leases
# (the row of a run whose lease ran out is settled by what the store says), so only a new row
# must be durable before its trigger is acknowledged. It halves the cost of a pick.
POOL_OPTIONS = "-c synchronous_commit=off"

_Q = sql.Identifier(QUEUE_TABLE)
_ORDER = sql.Identifier(QUEUE_ORDER_VIEW)
_TURNS = sql.Identifier(QUEUE_TURNS_TABLE)

CREATE_STATEMENTS = [
    sql.SQL(
        "CREATE TABLE IF NOT EXISTS {q} ("
        " run_id uuid PRIMARY KEY, seq bigserial NOT NULL, priority int NOT NULL,"
        " fair_key text NOT NULL DEFAULT '', not_before timestamptz NOT NULL DEFAULT now(),"
        " claimed_by text, lease_expires_at timestamptz,"
        " enqueued_at timestamptz NOT NULL DEFAULT now())"
    ).format(q=_Q),
    sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {q} (lease_expires_at)").format(
        i=sql.Identifier(f"{QUEUE_TABLE}_lease"), q=_Q
    ),
    sql.SQL(
        "CREATE INDEX IF NOT EXISTS {i} ON {q} (priority, fair_key, seq) WHERE claimed_by IS NULL"
    ).format(i=sql.Identifier(f"{QUEUE_TABLE}_waiting"), q=_Q),
    sql.SQL(
        "CREATE TABLE IF NOT EXISTS {t} (fair_key text PRIMARY KEY, served bigint NOT NULL)"
    ).format(t=_TURNS),
    sql.SQL("CREATE SEQUENCE IF NOT EXISTS {s}").format(
        s=sql.Identifier(f"{QUEUE_TURNS_TABLE}_served")
    ),
    sql.SQL(
        "CREATE OR REPLACE VIEW {v} AS"
        " SELECT run_id, row_number() OVER"
        " (ORDER BY priority, fair_rank, coalesce(served, 0), seq) AS position"
        " FROM (SELECT q.run_id, q.priority, q.seq, t.served, row_number() OVER"
        " (PARTITION BY q.priority, q.fair_key ORDER BY q.seq) AS fair_rank"
        " FROM {q} q LEFT JOIN {t} t USING (fair_key) WHERE q.claimed_by IS NULL) ranked"
    ).format(v=_ORDER, q=_Q, t=_TURNS),
]


@dataclass(frozen=True)
class Expired:
    run_id: UUID
    holder: str


class RunQueue:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        lease_s: float,
        global_slots: int = 0,
        fairness_label: str = "project",
    ) -> None:
        self._pool = pool
        self.lease_s = lease_s
        self.global_slots = global_slots  # 0: no limit across workers
        self.fairness_label = fairness_label  # "": no fairness, queue order within a priority

    async def create(self) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (QUEUE_LOCK_KEY,))
            for statement in CREATE_STATEMENTS:
                await conn.execute(statement)

    def fair_key(self, labels: Mapping[str, str]) -> str:
        return labels.get(self.fairness_label, "") if self.fairness_label else ""

    async def enqueue(self, run_id: UUID, priority: int, labels: Mapping[str, str]) -> bool:
        """Adds the run unless it has a row already (a duplicate or a requeue trigger)."""
        async with self._pool.connection() as conn, conn.transaction():
            # Durable before the trigger is acked, whatever the pool's default (see POOL_OPTIONS).
            await conn.execute("SET LOCAL synchronous_commit TO on")
            cur = await conn.execute(
                sql.SQL(
                    "INSERT INTO {q} (run_id, priority, fair_key) VALUES (%s, %s, %s)"
                    " ON CONFLICT (run_id) DO NOTHING"
                ).format(q=_Q),
                (run_id, priority, self.fair_key(labels)),
            )
            return bool(cur.rowcount == 1)

    async def pick(self, worker: str) -> UUID | None:
        """Claims the next run for worker, or None: nothing due, or the global limit reached."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (QUEUE_LOCK_KEY,))
            # The view's first row among those due, without ranking the whole queue: the best
            # priority, then the first due run of each key, the key served longest ago first;
            # its key is stamped as served in the same statement.
            cur = await conn.execute(
                sql.SQL(
                    "WITH due AS (SELECT run_id, priority, fair_key, seq FROM {q}"
                    " WHERE claimed_by IS NULL AND not_before <= now()),"
                    " firsts AS (SELECT DISTINCT ON (fair_key) run_id, fair_key, seq FROM due"
                    " WHERE priority = (SELECT min(priority) FROM due) ORDER BY fair_key, seq),"
                    " picked AS (UPDATE {q} SET claimed_by = %(worker)s,"
                    " lease_expires_at = now() + make_interval(secs => %(lease)s)"
                    " WHERE run_id = (SELECT f.run_id FROM firsts f LEFT JOIN {t} t"
                    " USING (fair_key) ORDER BY coalesce(t.served, 0), f.seq LIMIT 1)"
                    " AND (%(limit)s = 0"
                    " OR (SELECT count(*) FROM {q} WHERE claimed_by IS NOT NULL) < %(limit)s)"
                    " RETURNING run_id, fair_key),"
                    " stamped AS (INSERT INTO {t} (fair_key, served)"
                    " SELECT fair_key, nextval(%(served)s) FROM picked"
                    " ON CONFLICT (fair_key) DO UPDATE SET served = excluded.served)"
                    " SELECT run_id FROM picked"
                ).format(q=_Q, t=_TURNS),
                {
                    "worker": worker,
                    "lease": self.lease_s,
                    "limit": self.global_slots,
                    "served": f"{QUEUE_TURNS_TABLE}_served",
                },
            )
            row = await cur.fetchone()
            return UUID(str(row[0])) if row else None

    async def renew(self, worker: str, run_ids: Collection[UUID]) -> set[UUID]:
        """Extends worker's leases of these runs; returns the runs it still holds."""
        if not run_ids:
            return set()
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL(
                    "UPDATE {q} SET lease_expires_at = now() + make_interval(secs => %s)"
                    " WHERE run_id = ANY(%s) AND claimed_by = %s RETURNING run_id"
                ).format(q=_Q),
                (self.lease_s, list(run_ids), worker),
            )
            return {UUID(str(row[0])) for row in await cur.fetchall()}

    async def hold(self, run_id: UUID, holder: str) -> None:
        """Claims a row for holder with a fresh lease (a run the store says holder runs)."""
        async with self._pool.connection() as conn:
            await conn.execute(
                sql.SQL(
                    "UPDATE {q} SET claimed_by = %s,"
                    " lease_expires_at = now() + make_interval(secs => %s) WHERE run_id = %s"
                ).format(q=_Q),
                (holder, self.lease_s, run_id),
            )

    async def release(self, run_id: UUID, *, delay_s: float = 0.0) -> None:
        """Puts a claimed run back in the queue at its old place, due after delay_s."""
        async with self._pool.connection() as conn:
            await conn.execute(
                sql.SQL(
                    "UPDATE {q} SET claimed_by = NULL, lease_expires_at = NULL,"
                    " not_before = now() + make_interval(secs => %s) WHERE run_id = %s"
                ).format(q=_Q),
                (delay_s, run_id),
            )

    async def remove_waiting(self, run_id: UUID) -> None:
        """Removes the run's row unless a worker holds it (a queued run that was cancelled)."""
        async with self._pool.connection() as conn:
            await conn.execute(
                sql.SQL("DELETE FROM {q} WHERE run_id = %s AND claimed_by IS NULL").format(q=_Q),
                (run_id,),
            )

    async def remove(self, run_id: UUID) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(sql.SQL("DELETE FROM {q} WHERE run_id = %s").format(q=_Q), (run_id,))

    async def take_expired(self, recoverer: str, limit: int = 20) -> list[Expired]:
        """Claims rows whose lease ran out (their worker is gone) for recoverer, who gets a
        lease of its own: if it dies while recovering, another worker takes over."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL(
                    "WITH expired AS (SELECT run_id, claimed_by FROM {q}"
                    " WHERE lease_expires_at < now() ORDER BY lease_expires_at LIMIT %s"
                    " FOR UPDATE SKIP LOCKED)"
                    " UPDATE {q} q SET claimed_by = %s,"
                    " lease_expires_at = now() + make_interval(secs => %s)"
                    " FROM expired WHERE q.run_id = expired.run_id"
                    " RETURNING q.run_id, expired.claimed_by"
                ).format(q=_Q),
                (limit, recoverer, self.lease_s),
            )
            return [Expired(UUID(str(r[0])), str(r[1])) for r in await cur.fetchall()]

    async def depth(self) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {q} WHERE claimed_by IS NULL").format(q=_Q)
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

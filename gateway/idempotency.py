"""Idempotency keys: the first use of a key fixes the request it stands for, at once.

The read model learns of a request only after the command ran; a key reused with another body
before then must still be refused, so the gateway claims keys in a table of its own (one
INSERT per keyed submit). It records no event: the key's request is still created only by the
command handler.
"""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from domain.commands import RequestSpec
from projections.schema import SCHEMA_LOCK_KEY

TABLE = sql.Identifier("forgeline_idempotency_keys")


async def create_table(pool: AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn, conn.transaction():
        # Serialised with other processes creating tables at the same time.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {t} (key text PRIMARY KEY, request_id uuid NOT NULL,"
                " fingerprint text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
            ).format(t=TABLE)
        )


def fingerprint(spec: RequestSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


async def claim(
    pool: AsyncConnectionPool[Any], key: str, request_id: UUID, spec: RequestSpec
) -> bool:
    """True when the key is new or was used for this same body; False when it was used for
    another body."""
    mine = fingerprint(spec)
    async with pool.connection() as conn:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {t} (key, request_id, fingerprint) VALUES (%s, %s, %s)"
                " ON CONFLICT (key) DO NOTHING"
            ).format(t=TABLE),
            (key, request_id, mine),
        )
        cur = await conn.execute(
            sql.SQL("SELECT fingerprint FROM {t} WHERE key = %s").format(t=TABLE), (key,)
        )
        row = await cur.fetchone()
    return row is not None and row[0] == mine

"""The read tables. A prefix lets a rebuild fill fresh tables beside the live ones."""

from __future__ import annotations

from psycopg import sql

LIVE_PREFIX = "forgeline_view_"
POSITIONS_TABLE = "forgeline_projection_positions"
# Advisory lock taken around schema creation, by every process that creates tables.
SCHEMA_LOCK_KEY = 0x464F52474531


def tables(prefix: str) -> tuple[sql.Identifier, sql.Identifier]:
    """(requests table, runs table) for a prefix."""
    return sql.Identifier(f"{prefix}requests"), sql.Identifier(f"{prefix}runs")


def create_statements(prefix: str) -> list[sql.Composed]:
    requests, runs = tables(prefix)
    return [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {positions} ("
            " name text PRIMARY KEY, position bigint NOT NULL)"
        ).format(positions=sql.Identifier(POSITIONS_TABLE)),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {requests} ("
            " id uuid PRIMARY KEY, status text NOT NULL, repo text NOT NULL, ref text,"
            " prompt text NOT NULL, agent text NOT NULL, agent_options jsonb NOT NULL,"
            " priority int NOT NULL, timeout_s int NOT NULL, labels jsonb NOT NULL,"
            " idempotency_key text, created_at timestamptz NOT NULL,"
            " updated_at timestamptz NOT NULL, latest_run_id uuid NOT NULL)"
        ).format(requests=requests),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {index} ON {requests} (created_at DESC, id DESC)"
        ).format(index=sql.Identifier(f"{prefix}requests_newest"), requests=requests),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {index} ON {requests} (status, created_at DESC, id DESC)"
        ).format(index=sql.Identifier(f"{prefix}requests_status_newest"), requests=requests),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {runs} ("
            " id uuid PRIMARY KEY, request_id uuid NOT NULL, number int NOT NULL,"
            " status text NOT NULL, agent text NOT NULL, attempt int NOT NULL,"
            " exit_code int, error jsonb, queued_at timestamptz NOT NULL,"
            " started_at timestamptz, finished_at timestamptz, patch jsonb, usage jsonb,"
            " diff text)"
        ).format(runs=runs),
        sql.SQL("CREATE INDEX IF NOT EXISTS {index} ON {runs} (request_id, number)").format(
            index=sql.Identifier(f"{prefix}runs_request"), runs=runs
        ),
    ]


def drop_statements(prefix: str) -> list[sql.Composed]:
    requests, runs = tables(prefix)
    return [
        sql.SQL("DROP TABLE IF EXISTS {t}").format(t=requests),
        sql.SQL("DROP TABLE IF EXISTS {t}").format(t=runs),
    ]

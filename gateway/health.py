"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.errors import Error as NatsError
from prometheus_client import REGISTRY, generate_latest
from psycopg import AsyncConnection, sql
from psycopg import Error as PsycopgError
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker import dead_letters
from broker.relay import published_position
from domain.application import EVENTS_TABLE
from gateway._http import deps
from gateway.deps import GatewayDeps
from gateway.errors import ApiError
from projections.schema import LIVE_PREFIX, POSITIONS_TABLE, tables

log = logging.getLogger(__name__)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    d = deps(request)
    checks = {"nats": d.nc.is_connected, "postgres": False}
    with contextlib.suppress(Exception):
        async with d.pool.connection(timeout=2) as conn:
            await conn.execute("SELECT 1")
            checks["postgres"] = True
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


# Run durations (finished_at - started_at, from the read tables), in seconds.
RUN_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
PROJECTOR_NAME = f"{LIVE_PREFIX}tables"  # projections/runner.py's row in the positions table


class _Text:
    """Prometheus text format 0.0.4, a family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


async def metrics(request: Request) -> Response:
    """Every metric of docs/observability.md; 503 when the store does not answer."""
    d = deps(request)
    out = _Text()
    try:
        async with d.pool.connection(timeout=5) as conn:
            await _read_model_metrics(conn, out)
            store_position = await _store_metrics(conn, out)
    except (PsycopgError, PoolTimeout) as exc:
        log.warning("metrics: the store does not answer: %s", type(exc).__name__)
        raise ApiError(503, "store_unavailable", "the store does not answer; retry later") from None
    await _relay_metrics(d, out, store_position)
    await _dead_letter_metrics(d, out)
    text = "\n".join(out.lines) + "\n"
    # This process's own metrics: provisioning time (when a worker runs in it), process_*.
    text += generate_latest(REGISTRY).decode()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _read_model_metrics(conn: AsyncConnection[Any], out: _Text) -> None:
    requests_table, runs_table = tables(LIVE_PREFIX)
    out.family("forgeline_requests", "gauge", "Requests in the read model, by status.")
    cur = await conn.execute(
        sql.SQL("SELECT status, count(*) FROM {t} GROUP BY status ORDER BY status").format(
            t=requests_table
        )
    )
    for status, count in await cur.fetchall():
        out.sample("forgeline_requests", count, status=status)
    out.family("forgeline_runs", "gauge", "Runs in the read model, by status.")
    cur = await conn.execute(
        sql.SQL("SELECT status, count(*) FROM {t} GROUP BY status ORDER BY status").format(
            t=runs_table
        )
    )
    for status, count in await cur.fetchall():
        out.sample("forgeline_runs", count, status=status)

    cur = await conn.execute(
        sql.SQL(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(queued_at)), 0)"
            " FROM {t} WHERE status = 'queued'"
        ).format(t=runs_table)
    )
    row = await cur.fetchone()
    depth, oldest = (row[0], float(row[1])) if row else (0, 0.0)
    out.family("forgeline_queue_depth", "gauge", "Runs waiting for a worker (status queued).")
    out.sample("forgeline_queue_depth", depth)
    out.family("forgeline_queue_oldest_seconds", "gauge", "Age of the oldest queued run (0: none).")
    out.sample("forgeline_queue_oldest_seconds", round(oldest, 3))

    buckets = sql.SQL(", ").join(
        sql.SQL("count(*) FILTER (WHERE d <= {b})").format(b=sql.Literal(b))
        for b in RUN_DURATION_BUCKETS
    )
    cur = await conn.execute(
        sql.SQL(
            "SELECT status, {buckets}, count(*), coalesce(sum(d), 0) FROM ("
            " SELECT status, extract(epoch FROM finished_at - started_at)::float8 AS d FROM {t}"
            " WHERE finished_at IS NOT NULL AND started_at IS NOT NULL) x"
            " GROUP BY status ORDER BY status"
        ).format(buckets=buckets, t=runs_table)
    )
    name = "forgeline_run_duration_seconds"
    out.family(
        name, "histogram", "Time from start to end of finished runs (read model), by status."
    )
    for row in await cur.fetchall():
        status, counts = row[0], row[1 : 1 + len(RUN_DURATION_BUCKETS)]
        total, seconds = row[-2], float(row[-1])
        for bound, count in zip(RUN_DURATION_BUCKETS, counts, strict=True):
            out.sample(f"{name}_bucket", count, status=status, le=str(float(bound)))
        out.sample(f"{name}_bucket", total, status=status, le="+Inf")
        out.sample(f"{name}_count", total, status=status)
        out.sample(f"{name}_sum", round(seconds, 3), status=status)

    cur = await conn.execute(
        sql.SQL(
            "SELECT agent, count(usage),"
            " coalesce(sum((usage->>'input_tokens')::float8), 0),"
            " coalesce(sum((usage->>'output_tokens')::float8), 0),"
            " coalesce(sum((usage->>'cost_usd')::float8), 0)"
            " FROM {t} GROUP BY agent ORDER BY agent"
        ).format(t=runs_table)
    )
    usage = await cur.fetchall()
    families = [
        ("forgeline_agent_runs_with_usage", "Runs that made model calls through the LLM proxy."),
        ("forgeline_agent_input_tokens", "Input tokens the LLM proxy metered."),
        ("forgeline_agent_output_tokens", "Output tokens the LLM proxy metered."),
        ("forgeline_agent_cost_usd", "Cost the LLM proxy metered, in US dollars."),
    ]
    for i, (family, help_text) in enumerate(families, start=1):
        out.family(family, "gauge", f"{help_text} By agent, from the read model.")
        for row in usage:
            out.sample(family, row[i], agent=row[0])


async def _store_metrics(conn: AsyncConnection[Any], out: _Text) -> int:
    cur = await conn.execute(
        sql.SQL("SELECT coalesce(max(notification_id), 0) FROM {t}").format(
            t=sql.Identifier(EVENTS_TABLE)
        )
    )
    row = await cur.fetchone()
    store_position = int(row[0]) if row else 0
    out.family(
        "forgeline_store_position", "gauge", "Position of the newest event in the event store."
    )
    out.sample("forgeline_store_position", store_position)
    cur = await conn.execute(
        sql.SQL("SELECT position FROM {t} WHERE name = %s").format(
            t=sql.Identifier(POSITIONS_TABLE)
        ),
        (PROJECTOR_NAME,),
    )
    row = await cur.fetchone()
    if row is not None:
        out.family(
            "forgeline_projection_position", "gauge", "Last store position in the read tables."
        )
        out.sample("forgeline_projection_position", int(row[0]))
        out.family(
            "forgeline_projection_lag",
            "gauge",
            "Store positions not yet in the read tables (positions can have gaps).",
        )
        out.sample("forgeline_projection_lag", max(0, store_position - int(row[0])))
    return store_position


async def _relay_metrics(d: GatewayDeps, out: _Text, store_position: int) -> None:
    try:
        position = await asyncio.wait_for(published_position(d.js), 2)
    except (NatsError, TimeoutError, ValueError) as exc:
        log.warning("metrics: no relay position: %s", type(exc).__name__)
        return  # no relay metrics rather than wrong ones
    out.family("forgeline_relay_position", "gauge", "Last store position the relay published.")
    out.sample("forgeline_relay_position", position)
    out.family(
        "forgeline_relay_lag",
        "gauge",
        "Store positions not yet published to FORGELINE_EVENTS (positions can have gaps).",
    )
    out.sample("forgeline_relay_lag", max(0, store_position - position))


async def _dead_letter_metrics(d: GatewayDeps, out: _Text) -> None:
    try:
        kept = await asyncio.wait_for(dead_letters.count(d.js), 2)
    except (NatsError, TimeoutError) as exc:
        log.warning("metrics: no dead letter count: %s", type(exc).__name__)
        return
    out.family(
        "forgeline_dead_letters",
        "gauge",
        "Messages given up on, kept in FORGELINE_DEAD_LETTERS (GET /v1/dead-letters).",
    )
    out.sample("forgeline_dead_letters", kept)

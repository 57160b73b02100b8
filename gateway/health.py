"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib

from psycopg import sql
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from gateway._http import deps
from projections.schema import LIVE_PREFIX, tables


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


async def metrics(request: Request) -> PlainTextResponse:
    requests_table, runs_table = tables(LIVE_PREFIX)
    lines = [
        "# HELP forgeline_requests Requests in the read model, by status.",
        "# TYPE forgeline_requests gauge",
    ]
    async with deps(request).pool.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT status, count(*) FROM {t} GROUP BY status").format(t=requests_table)
        )
        for status, count in await cur.fetchall():
            lines.append(f'forgeline_requests{{status="{status}"}} {count}')
        lines += [
            "# HELP forgeline_runs Runs in the read model, by status.",
            "# TYPE forgeline_runs gauge",
        ]
        cur = await conn.execute(
            sql.SQL("SELECT status, count(*) FROM {t} GROUP BY status").format(t=runs_table)
        )
        for status, count in await cur.fetchall():
            lines.append(f'forgeline_runs{{status="{status}"}} {count}')
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

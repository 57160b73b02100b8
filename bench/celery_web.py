"""The alternative's HTTP endpoint: Starlette on uvicorn, an INSERT and a Celery enqueue.

`python -m bench.celery_web` (env as bench/celery_app.py) serves, on 127.0.0.1 (a free port;
prints `READY <port>`):

- POST /v1/requests: validates the body with the same model as Forgeline's gateway
  (domain.commands.RequestSpec), INSERTs a row (status queued, committed), enqueues
  `alt.process_request` to Redis, answers 202 {"request_id", "status_url"};
- GET /v1/requests/{id}: the row's status (and exit code, error).

No authentication, no idempotency key, no event history: only what such a pipeline needs.
Uvicorn is configured as Forgeline's gateway is.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.celery_app import SCHEMA, process_request
from bench.serving import serve_until_signalled
from domain.commands import RequestSpec


async def _serve() -> None:
    pool = AsyncConnectionPool(
        os.environ["BENCH_ALT_DATABASE_URL"], min_size=1, max_size=10, open=False
    )
    await pool.open()
    async with pool.connection() as conn:
        await conn.execute(SCHEMA)

    async def submit(request: Request) -> JSONResponse:
        try:
            spec = RequestSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"error": {"code": "invalid", "message": str(exc)}}, 422)
        request_id = uuid.uuid4()
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO alt_requests (id, repo, ref, prompt, status)"
                " VALUES (%s, %s, %s, %s, 'queued')",
                (request_id, spec.repo, spec.ref, spec.prompt),
            )
        process_request.delay(str(request_id))  # a synchronous Redis LPUSH, as most apps do
        return JSONResponse(
            {"request_id": str(request_id), "status_url": f"/v1/requests/{request_id}"}, 202
        )

    async def status(request: Request) -> JSONResponse:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT status, exit_code, error FROM alt_requests WHERE id = %s",
                (request.path_params["id"],),
            )
            row = await cur.fetchone()
        if row is None:
            return JSONResponse({"error": {"code": "not_found"}}, 404)
        return JSONResponse(
            {
                "id": request.path_params["id"],
                "status": row[0],
                "exit_code": row[1],
                "error": row[2],
            }
        )

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/v1/requests", submit, methods=["POST"]),
            Route("/v1/requests/{id}", status, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
    await serve_until_signalled(app)
    await pool.close()


def main() -> int:
    asyncio.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

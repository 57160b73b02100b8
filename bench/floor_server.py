"""The floor of command ingest: a bare Starlette endpoint that does one JetStream publish.

`python -m bench.floor_server NATS_URL` serves POST /v1/requests on 127.0.0.1 (a free port;
prints `READY <port>`): it reads the body, wraps it in the bytes of a submit command (string
concatenation, no parsing, no validation, no auth), publishes it to FORGELINE_COMMANDS (the
same stream declaration, Nats-Msg-Id = a fresh command id) awaiting JetStream's ack, and
answers 202. Uvicorn is configured as the gateway's (forgeline/bootstrap.py). Nothing else.
POST /v1/null answers 202 without publishing: the ceiling of the HTTP path on this machine.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

import nats
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.serving import serve_until_signalled
from broker import subjects
from broker.streams import ensure_streams


async def _serve(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_streams(js)
    subject = subjects.command_subject("submit")

    async def submit(request: Request) -> JSONResponse:
        body = await request.body()
        request_id, run_id = str(uuid.uuid4()), str(uuid.uuid4())
        command_id = f"submit:{request_id}"
        payload = (
            b'{"kind":"submit","command_id":"'
            + command_id.encode()
            + b'","request_id":"'
            + request_id.encode()
            + b'","run_id":"'
            + run_id.encode()
            + b'","spec":'
            + body
            + b',"idempotency_key":null,"submitted_by":null}'
        )
        await js.publish(
            subject,
            payload,
            timeout=5,
            stream=subjects.COMMANDS_STREAM,
            headers={"Nats-Msg-Id": command_id},
        )
        return JSONResponse(
            {
                "request_id": request_id,
                "run_id": run_id,
                "status_url": f"/v1/requests/{request_id}",
            },
            status_code=202,
        )

    async def null(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"request_id": None}, status_code=202)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/v1/requests", submit, methods=["POST"]),
            Route("/v1/null", null, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
    await serve_until_signalled(app)
    await nc.drain()


def main() -> int:
    asyncio.run(_serve(sys.argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

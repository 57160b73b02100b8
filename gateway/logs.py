"""GET /v1/runs/{id}/logs: the run's output as server-sent events, from FORGELINE_LOGS."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from starlette.requests import Request
from starlette.responses import StreamingResponse

from broker.logs import read_log
from domain.status import RunStatus
from gateway import scope
from gateway._http import deps, path_id
from gateway.deps import GatewayDeps
from gateway.errors import not_found


async def stream_logs(request: Request) -> StreamingResponse:
    run_id = path_id(request, "run")
    await scope.check_run(request, run_id)
    d = deps(request)
    if await d.views.get_run(run_id) is None:
        raise not_found("run", str(run_id))
    follow = request.query_params.get("follow", "1") not in ("0", "false", "no")
    return StreamingResponse(
        _events(d, run_id, follow=follow),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(d: GatewayDeps, run_id: UUID, *, follow: bool) -> AsyncIterator[str]:
    async def finished() -> bool:
        return RunStatus(await _status(d, run_id)).is_terminal

    async for line in read_log(d.js, run_id, follow=follow, is_finished=finished):
        yield _sse("log", line)
    status = await _status(d, run_id)
    if RunStatus(status).is_terminal or not follow:
        yield _sse("end", {"status": status})


async def _status(d: GatewayDeps, run_id: UUID) -> str:
    run = await d.views.get_run(run_id)
    return str(run["status"]) if run else RunStatus.QUEUED.value


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

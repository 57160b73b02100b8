"""Read endpoints: the projections, the patch, and the history from the event store."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker import dead_letters
from domain.status import REQUEST_STATUSES
from gateway import scope
from gateway._http import deps, path_id
from gateway.auth import current_key
from gateway.errors import ApiError, not_found
from projections.audit import request_history
from projections.views import InvalidCursor

MAX_PAGE = 200
MAX_DEAD_LETTERS = 100


async def get_request(request: Request) -> JSONResponse:
    request_id = path_id(request, "request")
    await scope.check_request(request, request_id)
    view = await deps(request).views.get_request(request_id)
    if view is None:
        raise not_found("request", str(request_id))
    return JSONResponse(view)


async def list_requests(request: Request) -> JSONResponse:
    status = request.query_params.get("status") or None
    if status is not None and status not in REQUEST_STATUSES:
        raise ApiError(400, "invalid_query", f"status must be one of {', '.join(REQUEST_STATUSES)}")
    raw_limit = request.query_params.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise ApiError(400, "invalid_query", f"limit must be a whole number from 1 to {MAX_PAGE}")
    cursor = request.query_params.get("cursor") or None  # empty: the first page, as status=
    key = current_key(request)
    try:
        if key.scoped:
            items, next_cursor = await scope.list_requests(
                request, projects=key.projects, status=status, limit=int(raw_limit), cursor=cursor
            )
        else:
            items, next_cursor = await deps(request).views.list_requests(
                status=status, limit=int(raw_limit), cursor=cursor
            )
    except InvalidCursor as exc:
        raise ApiError(400, "invalid_query", str(exc)) from None
    return JSONResponse({"items": items, "next_cursor": next_cursor})


async def get_run(request: Request) -> JSONResponse:
    run_id = path_id(request, "run")
    await scope.check_run(request, run_id)
    view = await deps(request).views.get_run(run_id)
    if view is None:
        raise not_found("run", str(run_id))
    return JSONResponse(view)


async def get_patch(request: Request) -> Response:
    run_id = path_id(request, "run")
    await scope.check_run(request, run_id)
    views = deps(request).views
    diff = await views.get_run_diff(run_id)
    if diff is None and await views.get_run(run_id) is None:
        raise not_found("run", str(run_id))
    if not diff:
        raise ApiError(404, "not_found", f"run {run_id} has no patch (yet)")
    return Response(diff, media_type="text/x-diff")


async def get_request_events(request: Request) -> JSONResponse:
    request_id = path_id(request, "request")
    d = deps(request)
    history = await request_history(d.app, d.pool, request_id)
    if history is None or not scope.may_see_history(request, history):
        raise not_found("request", str(request_id))
    return JSONResponse({"events": history})


async def list_dead_letters(request: Request) -> JSONResponse:
    """Messages the consumers gave up on, newest first, with why (operators, all projects)."""
    raw_limit = request.query_params.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_DEAD_LETTERS:
        raise ApiError(
            400, "invalid_query", f"limit must be a whole number from 1 to {MAX_DEAD_LETTERS}"
        )
    d = deps(request)
    total = await dead_letters.count(d.js)
    items = await dead_letters.recent(d.js, int(raw_limit))
    return JSONResponse({"items": items, "total": total})

"""The API's error format, and the mapping of every failure to it.

`{"error": {"code", "message", "details"}}` with the right status; never a 500 for bad input.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import OperationalError
from psycopg_pool import PoolTimeout
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or {}


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what} with id {ident}")


def validation_failed(exc: ValidationError) -> ApiError:
    details = [
        {
            "field": ".".join(str(part) for part in err["loc"]) or None,
            "message": err["msg"],
            "type": err["type"],
        }
        for err in exc.errors(include_url=False, include_input=False)
    ]
    fields = ", ".join(sorted({d["field"] for d in details if d["field"]})) or "body"
    return ApiError(422, "validation_failed", f"invalid request: check {fields}", details)


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return error_response(exc.status_code, code, str(exc.detail), headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method of the path: Starlette's own Allow names only the first route of the path
    (GET /v1/keys and POST /v1/keys are two routes)."""
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    # Postgres away (restarting, unreachable): the client may retry; nothing was recorded.
    log.warning("the database does not answer on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "store_unavailable",
        "the database does not answer; nothing was recorded, retry later",
        headers={"Retry-After": "1"},
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "an unexpected error occurred; see the logs")


EXCEPTION_HANDLERS = {
    ApiError: _api_error,
    HTTPException: _http_error,
    OperationalError: _store_unavailable,
    PoolTimeout: _store_unavailable,
    Exception: _unexpected,
}

"""The gateway's error mapping: a database that stops answering mid-request is a 503 the client
may retry, never a 500 (the fault suite's Postgres restart found POSTs answered 500)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from psycopg import OperationalError
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import EXCEPTION_HANDLERS


def _post(app: Starlette) -> httpx.Response:
    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.post("/v1/requests", json={})

    return asyncio.run(post())


def _app(exc: Exception) -> Starlette:
    async def endpoint(request: Request) -> Response:
        raise exc

    return Starlette(
        routes=[Route("/v1/requests", endpoint, methods=["POST"])],
        exception_handlers=EXCEPTION_HANDLERS,
    )


@pytest.mark.parametrize(
    "exc",
    [
        OperationalError("connection to server on socket failed: No such file or directory"),
        PoolTimeout("couldn't get a connection after 5.00 sec"),
    ],
)
def test_a_database_that_does_not_answer_is_a_503_to_retry(exc: Exception) -> None:
    response = _post(_app(exc))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "store_unavailable"
    assert "retry later" in error["message"]


def test_any_other_error_stays_a_500_without_details() -> None:
    response = _post(_app(RuntimeError("secret detail")))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "secret detail" not in response.text

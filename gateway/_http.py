"""Small request helpers shared by the route modules."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from starlette.requests import Request

from gateway.deps import GatewayDeps
from gateway.errors import ApiError, not_found


def deps(request: Request) -> GatewayDeps:
    value = request.app.state.deps
    assert isinstance(value, GatewayDeps)
    return value


def path_id(request: Request, what: str) -> UUID:
    raw = request.path_params["id"]
    try:
        return UUID(raw)
    except ValueError:
        raise not_found(what, raw) from None


async def json_body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object, read with the size limit enforced while reading."""
    limit = deps(request).max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip() and optional:
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    where = _nul_at(body, "")
    if where is not None:
        # Postgres text and jsonb cannot hold U+0000: such a request would be stored as an
        # event that no read table can take (the projector would stop on it).
        raise ApiError(
            422,
            "validation_failed",
            f"invalid request: check {where or 'body'}",
            [{"field": where or None, "message": "must not contain U+0000", "type": "nul"}],
        )
    return body


def _nul_at(value: Any, path: str) -> str | None:
    """The dotted path of the first string (or key) holding U+0000, else None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if "\x00" in key:
                return here
            found = _nul_at(item, here)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_at(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")

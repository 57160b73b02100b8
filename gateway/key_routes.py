"""Key management over HTTP (admin), and /v1/whoami (any key).

- `GET /v1/whoami` 200 the calling key (id, name, role, projects, dates; never a secret).
- `GET /v1/keys` 200 `{"items": [key...]}`, revoked ones included, oldest first.
- `POST /v1/keys` body `{"role", "projects"?, "name"?}` 201 the key plus `"key"`: the secret,
  shown this once.
- `POST /v1/keys/{id}/revoke` 200 the key, revoked: at once on this gateway, on the others
  within their key cache's TTL (gateway/verified_keys.py); 404 unknown.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway import keys
from gateway._http import deps, json_body
from gateway.auth import current_key, verified_keys
from gateway.errors import not_found, validation_failed

log = logging.getLogger(__name__)


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse(current_key(request).as_json())


async def list_keys(request: Request) -> JSONResponse:
    async with deps(request).pool.connection() as conn:
        items = await keys.list_keys(conn)
    return JSONResponse({"items": [key.as_json() for key in items]})


async def create_key(request: Request) -> JSONResponse:
    body = await json_body(request)
    try:
        spec = keys.KeySpec.model_validate(body)
    except ValidationError as exc:
        raise validation_failed(exc) from None
    async with deps(request).pool.connection() as conn:
        key, secret = await keys.create_key(conn, spec)
    log.info("key %s (%s) created by key %s", key.id, key.role.value, current_key(request).id)
    return JSONResponse({**key.as_json(), "key": secret}, status_code=201)


async def revoke_key(request: Request) -> JSONResponse:
    key_id = request.path_params["id"]
    if "\x00" in key_id:  # Postgres text cannot hold it: no key has such an id
        raise not_found("key", key_id.replace("\x00", "\\0"))
    async with deps(request).pool.connection() as conn:
        key = await keys.revoke_key(conn, key_id)
    if key is None:
        raise not_found("key", key_id)
    verified_keys(request).forget(key.id)  # at once here; elsewhere within their cache's TTL
    log.info("key %s revoked by key %s", key.id, current_key(request).id)
    return JSONResponse(key.as_json())

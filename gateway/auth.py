"""Who may call what: API keys on every endpoint but /healthz and /readyz.

Each route's endpoint is wrapped by `requires(role)`: it reads `Authorization: Bearer <key>`,
finds the key (401 without one, or with an unknown or revoked one), takes a token from the
key's rate-limit bucket (429 with Retry-After), checks the role (403), and leaves the key on
`request.state.api_key` for the endpoint, which applies the key's projects (gateway/scope.py).

| role     | may                                                               |
| -------- | ----------------------------------------------------------------- |
| viewer   | read requests, runs, patches, logs, events; /metrics; /v1/whoami |
| operator | + submit, rerun, cancel                                          |
| admin    | + manage keys (/v1/keys); never limited to projects              |
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable

from psycopg import Error as PsycopgError
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import Response

from gateway import keys
from gateway._http import deps
from gateway.errors import ApiError
from gateway.keys import ApiKey, Role
from gateway.ratelimit import RateLimiter
from gateway.verified_keys import VerifiedKeys

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]

_BEARER = re.compile(r"^Bearer[ \t]+([!-~]{1,512})[ \t]*$", re.IGNORECASE)
_REALM = 'Bearer realm="forgeline"'
_INVALID = 'Bearer realm="forgeline", error="invalid_token"'


def requires(role: Role, *, unscoped: bool = False) -> Callable[[Endpoint], Endpoint]:
    """The endpoint needs a key of this role or above; with unscoped, one limited to no
    projects (e.g. /metrics, which counts every project's requests)."""

    def wrap(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            key = await authenticate(request)
            _take_token(request, key)
            if not key.role.allows(role):
                raise ApiError(
                    403,
                    "forbidden",
                    f"this needs the {role.value} role or above; the key {key.id} is "
                    f"{key.role.value}",
                )
            if unscoped and key.scoped:
                raise ApiError(
                    403,
                    "forbidden",
                    f"this covers every project; the key {key.id} is limited to projects",
                )
            request.state.api_key = key
            return await endpoint(request)

        guarded.required_role = role  # type: ignore[attr-defined]  # for docs and tests
        return guarded

    return wrap


def current_key(request: Request) -> ApiKey:
    """The key the request was authenticated with (set by `requires`)."""
    key = getattr(request.state, "api_key", None)
    assert isinstance(key, ApiKey), "the endpoint is not wrapped by requires()"
    return key


async def authenticate(request: Request) -> ApiKey:
    header = request.headers.get("authorization")
    if not header:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is needed: send the header `Authorization: Bearer <key>` "
            "(the CLI sends FORGELINE_API_KEY)",
            headers={"WWW-Authenticate": _REALM},
        )
    match = _BEARER.match(header)
    if match is None:
        raise ApiError(
            401,
            "unauthorized",
            "the Authorization header must be `Bearer <key>`",
            headers={"WWW-Authenticate": _INVALID},
        )
    secret = match.group(1)
    secret_digest = keys.digest(secret)
    verified = verified_keys(request)
    key = verified.get(secret_digest)
    if key is not None:
        return key  # found valid less than verified.ttl_s ago (gateway/verified_keys.py)
    try:
        async with deps(request).pool.connection(timeout=5) as conn:
            key = await keys.find_key(conn, secret)
            if key is not None and key.revoked_at is None:
                await keys.touch(conn, key)
    except (PsycopgError, PoolTimeout) as exc:
        log.warning("cannot check an API key: %s", type(exc).__name__)
        raise ApiError(
            503,
            "store_unavailable",
            "the API key cannot be checked now (the database does not answer); retry later",
        ) from None
    if key is None:
        raise ApiError(
            401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": _INVALID}
        )
    if key.revoked_at is not None:
        raise ApiError(
            401,
            "unauthorized",
            f"the API key {key.id} was revoked",
            headers={"WWW-Authenticate": _INVALID},
        )
    verified.keep(secret_digest, key)
    return key


def verified_keys(request: Request) -> VerifiedKeys:
    value = request.app.state.verified_keys
    assert isinstance(value, VerifiedKeys)
    return value


def _take_token(request: Request, key: ApiKey) -> None:
    limiter = request.app.state.limiter
    assert isinstance(limiter, RateLimiter)
    wait = limiter.take(key.id)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"too many requests with the key {key.id} (at most {limiter.per_minute} a minute,"
            f" {limiter.burst} at once); retry in {wait} s",
            details=[{"retry_after_s": wait}],
            headers={"Retry-After": str(wait)},
        )

"""The Starlette application: routes of the HTTP contract v1, each with the role it needs."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from gateway import agents, commands, health, key_routes, logs, reads
from gateway.auth import requires
from gateway.deps import GatewayDeps
from gateway.errors import EXCEPTION_HANDLERS
from gateway.keys import Role
from gateway.openapi import ROUTES as DOC_ROUTES  # /openapi.json, /docs, /asyncapi.json (no key)
from gateway.ratelimit import RateLimiter
from gateway.ui import ROUTES as UI_ROUTES  # the web UI: / and /static/ (no key needed)
from gateway.verified_keys import VerifiedKeys

VIEWER, OPERATOR, ADMIN = (requires(role) for role in (Role.VIEWER, Role.OPERATOR, Role.ADMIN))

ROUTES = [
    Route("/v1/requests", OPERATOR(commands.submit_request), methods=["POST"]),
    Route("/v1/requests", VIEWER(reads.list_requests), methods=["GET"]),
    Route("/v1/requests/{id}", VIEWER(reads.get_request), methods=["GET"]),
    Route("/v1/requests/{id}/events", VIEWER(reads.get_request_events), methods=["GET"]),
    Route("/v1/requests/{id}/rerun", OPERATOR(commands.rerun_request), methods=["POST"]),
    Route("/v1/requests/{id}/cancel", OPERATOR(commands.cancel_request), methods=["POST"]),
    Route("/v1/runs/{id}", VIEWER(reads.get_run), methods=["GET"]),
    Route("/v1/runs/{id}/patch", VIEWER(reads.get_patch), methods=["GET"]),
    Route("/v1/runs/{id}/logs", VIEWER(logs.stream_logs), methods=["GET"]),
    Route("/v1/agents", VIEWER(agents.list_agents), methods=["GET"]),
    Route("/v1/whoami", VIEWER(key_routes.whoami), methods=["GET"]),
    Route(
        "/v1/dead-letters",
        requires(Role.OPERATOR, unscoped=True)(reads.list_dead_letters),
        methods=["GET"],
    ),
    Route("/v1/keys", ADMIN(key_routes.list_keys), methods=["GET"]),
    Route("/v1/keys", ADMIN(key_routes.create_key), methods=["POST"]),
    Route("/v1/keys/{id}/revoke", ADMIN(key_routes.revoke_key), methods=["POST"]),
    # Without a key: probes of load balancers and orchestrators.
    Route("/healthz", health.healthz, methods=["GET"]),
    Route("/readyz", health.readyz, methods=["GET"]),
    Route("/metrics", requires(Role.VIEWER, unscoped=True)(health.metrics), methods=["GET"]),
]

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


def create_app(deps: GatewayDeps) -> Starlette:
    middleware = []
    if deps.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(deps.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
                expose_headers=["Retry-After"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=[*ROUTES, *DOC_ROUTES, *UI_ROUTES],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=middleware,
    )
    app.state.deps = deps
    app.state.limiter = RateLimiter(deps.rate_limit_per_min, deps.rate_limit_burst)
    app.state.verified_keys = VerifiedKeys(deps.key_cache_s)
    return app

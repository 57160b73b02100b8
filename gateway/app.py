"""The Starlette application: routes of the HTTP contract v1."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Route

from gateway import commands, health, logs, reads
from gateway.deps import GatewayDeps
from gateway.errors import EXCEPTION_HANDLERS

ROUTES = [
    Route("/v1/requests", commands.submit_request, methods=["POST"]),
    Route("/v1/requests", reads.list_requests, methods=["GET"]),
    Route("/v1/requests/{id}", reads.get_request, methods=["GET"]),
    Route("/v1/requests/{id}/events", reads.get_request_events, methods=["GET"]),
    Route("/v1/requests/{id}/rerun", commands.rerun_request, methods=["POST"]),
    Route("/v1/requests/{id}/cancel", commands.cancel_request, methods=["POST"]),
    Route("/v1/runs/{id}", reads.get_run, methods=["GET"]),
    Route("/v1/runs/{id}/patch", reads.get_patch, methods=["GET"]),
    Route("/v1/runs/{id}/logs", logs.stream_logs, methods=["GET"]),
    Route("/healthz", health.healthz, methods=["GET"]),
    Route("/readyz", health.readyz, methods=["GET"]),
    Route("/metrics", health.metrics, methods=["GET"]),
]


def create_app(deps: GatewayDeps) -> Starlette:
    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS)
    app.state.deps = deps
    return app

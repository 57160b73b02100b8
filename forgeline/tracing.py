"""OpenTelemetry tracing: set up from the standard OTEL_* environment variables, off by default.

Tracing is on when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
`OTEL_EXPORTER_OTLP_ENDPOINT`), unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
Off, no SDK is loaded and no exporter made: the instrumented code calls the OpenTelemetry API,
whose spans are no-ops. On, spans go in batches to the endpoint over OTLP/HTTP (protobuf); the
exporter reads its other settings (headers, timeout, compression, certificates) and the
sampler (`OTEL_TRACES_SAMPLER`) from the same standard variables. docs/observability.md lists
the spans.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import tracing as broker_tracing
from forgeline.startup import ALL_ROLES

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
SUPPORTED_PROTOCOL = "http/protobuf"
# Probes and scrapes come every few seconds and say nothing about a request: not traced.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
UNTRACED_PREFIXES = ("/static/",)


class TracingConfigError(ValueError):
    """An OTEL_* setting this build cannot honour; the message names it and the fix."""


def exporter_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces to be exported; TracingConfigError when it asks
    for an exporter or protocol this build does not have."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")}
    exporters.discard("")
    if exporters == {"none"}:
        return False
    if not any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES):
        return False
    if exporters - {"otlp"}:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']}: only otlp (or none) is supported"
        )
    for name in PROTOCOL_VARIABLES:
        protocol = env.get(name, "").strip().lower()
        if protocol:
            if protocol != SUPPORTED_PROTOCOL:
                raise TracingConfigError(
                    f"{name}={protocol}: only {SUPPORTED_PROTOCOL} is supported (OTLP over "
                    "HTTP; a collector's port 4318)"
                )
            break  # the signal-specific variable wins over the general one
    return True


def configure_tracing(service_name: str, env: Mapping[str, str] | None = None) -> str | None:
    """Installs the SDK with an OTLP/HTTP exporter when the environment asks for it; returns
    the service name the spans carry, or None (tracing off). Spans still buffered are sent
    when the process exits (the SDK's atexit hook flushes them)."""
    env = os.environ if env is None else env
    if not exporter_configured(env):
        return None
    # Imported only here: with tracing off the SDK and the exporter are never loaded.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (read by Resource.create) win.
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {SERVICE_NAME: service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    broker_tracing.provider_changed()
    return str(resource.attributes.get(SERVICE_NAME))


def service_name(roles: frozenset[str]) -> str:
    """`forgeline` for a process running every role, else `forgeline-<role>[-<role>...]`."""
    return "forgeline" if roles == ALL_ROLES else "forgeline-" + "-".join(sorted(roles))


def start_tracing(roles: frozenset[str]) -> bool:
    """configure_tracing for a server process running roles; says so on stderr when on."""
    name = configure_tracing(service_name(roles))
    if name is None:
        return False
    print(f"tracing on: spans exported over OTLP/HTTP as service {name}", file=sys.stderr)
    return True


class TracingMiddleware:
    """A server span per HTTP request (pure ASGI, so the span is current in the endpoint and
    the command it publishes carries it). A `traceparent` the client sent is continued."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.tracer = trace.get_tracer("forgeline.gateway")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in UNTRACED_PATHS or path.startswith(UNTRACED_PREFIXES):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": path}
        with self.tracer.start_as_current_span(
            method,
            context=broker_tracing.context_from(headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:

            async def send_and_note(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            try:
                await self.app(scope, receive, send_and_note)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None)
                if template:
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.route", template)


def traced_asgi(app: ASGIApp) -> ASGIApp:
    """app inside TracingMiddleware when this process exports traces; else app itself."""
    return TracingMiddleware(app) if broker_tracing.enabled() else app

"""OpenTelemetry trace context across NATS: W3C `traceparent` in message headers, and the trace
a run belongs to, kept beside the run for the executor.

Only the OpenTelemetry API is used here. Until the process configures an SDK with an exporter
(forgeline/tracing.py), every span is a no-op and `enabled()` is false: nothing is added to
messages and nothing is written to NATS.

Only `traceparent` and `tracestate` travel (the W3C trace-context propagator alone, no
baggage): a header a client sent to the gateway never reaches a message otherwise.

The executor reacts to events the relay publishes from the store, not to the command, so the
command's trace cannot reach it in a header without changing the events. Instead the command
handler records, for the run a submit or rerun creates, the trace context of the span that
handles the command, in the KV bucket FORGELINE_TRACES (key: the run id, value: the headers as
JSON, kept a day). The executor looks it up when the run's trigger arrives and starts
the run's span as a child of it. Events stay as they are, and the bucket holds trace ids only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Iterator, Mapping
from typing import Any
from uuid import UUID

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from domain.commands import CancelRequest, RerunRequest, SubmitRequest

log = logging.getLogger(__name__)

TRACES_BUCKET = "FORGELINE_TRACES"
TRACES_TTL_S = 24 * 3600  # a run starts within minutes; a trace link older than this is lost
# A trace is a diagnosis aid: a NATS hiccup costs the link to the executor's spans, never
# the command, and never waits long.
_KV_TIMEOUT_S = 2.0

_propagator = TraceContextTextMapPropagator()
tracer = trace.get_tracer("forgeline.broker")
_buckets: weakref.WeakKeyDictionary[JetStreamContext, KeyValue] = weakref.WeakKeyDictionary()


_enabled: bool | None = None  # enabled()'s answer, kept: it is asked on every span


def enabled() -> bool:
    """True once this process has an SDK tracer provider (forgeline/tracing.py set one up)."""
    global _enabled
    if _enabled is None:
        provider = trace.get_tracer_provider()
        _enabled = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return _enabled


def provider_changed() -> None:
    """Called after the global tracer provider was set: enabled() looks again."""
    global _enabled
    _enabled = None


def current_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current span; empty when there is none."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def context_from(headers: Mapping[str, str] | None) -> Context:
    """The trace context the headers carry (an empty context when they carry none)."""
    return _propagator.extract(dict(headers or {}))


def messaging_attributes(
    subject: str, operation: str, more: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
        **(more or {}),
    }


@contextlib.contextmanager
def sending(subject: str, attributes: Mapping[str, Any] | None = None) -> Iterator[dict[str, str]]:
    """A producer span around a publish; yields the headers that carry it to the consumer."""
    if not enabled():  # cheaper than the API's no-op span
        yield {}
        return
    with tracer.start_as_current_span(
        f"send {subject}",
        kind=SpanKind.PRODUCER,
        attributes=messaging_attributes(subject, "send", attributes),
    ):
        yield current_headers()


@contextlib.contextmanager
def processing(subject: str, headers: Mapping[str, str] | None) -> Iterator[Span]:
    """A consumer span around handling a message, child of the trace its headers carry;
    attributes can be added to the span it yields once the message is decoded."""
    if not enabled():
        yield trace.INVALID_SPAN
        return
    with tracer.start_as_current_span(
        f"process {subject}",
        context=context_from(headers),
        kind=SpanKind.CONSUMER,
        attributes=messaging_attributes(subject, "process"),
    ) as span:
        yield span


def ids(**values: UUID | str | None) -> dict[str, str]:
    """Span attributes `forgeline.<name>` for the ids given (request_id, run_id, ...)."""
    return {f"forgeline.{name}": str(value) for name, value in values.items() if value is not None}


def command_attributes(command: SubmitRequest | RerunRequest | CancelRequest) -> dict[str, str]:
    """What a span about a command says of it: its id, kind, request and run."""
    return {
        "messaging.message.id": command.command_id,
        "forgeline.command": command.kind,
        **ids(request_id=command.request_id, run_id=command.run_id),
    }


async def remember_run_trace(js: JetStreamContext, run_id: UUID) -> None:
    """Records the current span's context as the trace of run_id (when tracing is on)."""
    if not enabled():
        return
    headers = current_headers()
    if not headers:
        return
    try:
        kv = await _bucket(js)
        await asyncio.wait_for(kv.put(str(run_id), json.dumps(headers).encode()), _KV_TIMEOUT_S)
    except (NatsError, TimeoutError, OSError) as exc:
        log.warning("tracing: the trace of run %s was not recorded: %s", run_id, type(exc).__name__)


async def run_trace(js: JetStreamContext, run_id: UUID) -> Context | None:
    """The trace context recorded for run_id, or None (tracing off, none recorded, NATS away)."""
    if not enabled():
        return None
    try:
        kv = await _bucket(js)
        entry = await asyncio.wait_for(kv.get(str(run_id)), _KV_TIMEOUT_S)
        headers = json.loads(entry.value or b"{}")
    except KeyNotFoundError:
        return None
    except (NatsError, TimeoutError, OSError, ValueError) as exc:
        log.warning("tracing: the trace of run %s was not read: %s", run_id, type(exc).__name__)
        return None
    return context_from(headers) if isinstance(headers, dict) else None


async def _bucket(js: JetStreamContext) -> KeyValue:
    kv = _buckets.get(js)
    if kv is None:
        try:
            kv = await asyncio.wait_for(js.key_value(TRACES_BUCKET), _KV_TIMEOUT_S)
        except BucketNotFoundError:
            # Made on first use by whichever process needs it first; creating it twice with
            # the same configuration is harmless.
            kv = await asyncio.wait_for(
                js.create_key_value(
                    KeyValueConfig(bucket=TRACES_BUCKET, history=1, ttl=TRACES_TTL_S)
                ),
                _KV_TIMEOUT_S,
            )
        _buckets[js] = kv
    return kv

"""Spans of the command handler and the executor (OpenTelemetry API; no-ops unless the process
set up an exporter, see forgeline/tracing.py and docs/observability.md).

Every span made here carries `forgeline.request_id` and `forgeline.run_id` from the log
context (handlers/log_context.py), so a trace names the request and run it is about exactly
as the JSON logs do.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from broker import tracing as broker_tracing
from handlers import log_context

tracer = trace.get_tracer("forgeline.handlers")

P = ParamSpec("P")
T = TypeVar("T")


def _ids() -> dict[str, str]:
    return {f"forgeline.{name}": value for name, value in log_context.current().items()}


@contextlib.contextmanager
def step(name: str) -> Iterator[Span]:
    """A span `forgeline.<name>` for one step of the work, with the request and run ids."""
    if not broker_tracing.enabled():  # tracing off: not even the API's no-op span
        yield trace.INVALID_SPAN
        return
    with tracer.start_as_current_span(f"forgeline.{name}", attributes=_ids()) as span:
        yield span


@contextlib.contextmanager
def within(span: Span | None) -> Iterator[None]:
    """Makes span the current one (the parent of the spans made inside), without ending it."""
    if span is None or not broker_tracing.enabled():
        yield
        return
    with trace.use_span(span, end_on_exit=False):
        yield


def traced(name: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Decorates an async function: each call is the span `forgeline.<name>`."""

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            with step(name):
                return await fn(*args, **kwargs)

        return wrapper

    return decorate


def traced_sync(name: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorates a function: each call is the span `forgeline.<name>`."""

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            with step(name):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


async def agent_span(running: Awaitable[int]) -> int:
    """Awaits the agent inside the span `forgeline.agent`, which records its exit code."""
    with step("agent") as span:
        exit_code = await running
        span.set_attribute("forgeline.exit_code", exit_code)
        return exit_code


@contextlib.asynccontextmanager
async def executing(js: JetStreamContext, run_id: UUID) -> AsyncIterator[Span]:
    """The executor's span for a run's trigger, in the trace of the command that queued the run
    (broker/tracing.py: recorded beside the run by the command handler); a trace of its own
    when none was recorded."""
    if not broker_tracing.enabled():
        yield trace.INVALID_SPAN
        return
    parent = await broker_tracing.run_trace(js, run_id)
    with tracer.start_as_current_span(
        "forgeline.run",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={**_ids(), "forgeline.run_id": str(run_id)},
    ) as span:
        yield span

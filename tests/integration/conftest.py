"""Fixtures for the integration tests: a NATS server of each test's own, a store, async polling.

NATS is per test here (not the session's `nats_url`): the relay, the executor and the
command handler all read whole streams and durable consumers, so a test must start from
empty streams. An embedded nats-server starts in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from broker.connection import connect
from broker.streams import ensure_streams
from domain.application import EVENTS_TABLE, Forgeline
from forgeline.bootstrap import open_store
from forgeline.embedded import start_nats

Predicate = Callable[[], Any]


async def eventually(
    predicate: Predicate, timeout: float = 10.0, message: str = "condition", interval: float = 0.05
) -> Any:
    """Polls predicate (sync, or returning an awaitable) until it gives something truthy.

    The async twin of tests.helpers.wait_until: it yields to the event loop between polls, so
    services running in the test's loop make progress. Exceptions count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {message}{detail}")
        await asyncio.sleep(interval)


async def kill(task: asyncio.Task[Any]) -> None:
    """Cancels the task wherever it is, like a crash, and waits until it is gone.

    One cancel is not always enough on Python 3.11: asyncio.wait_for (used inside nats-py)
    drops a cancellation that arrives just as the awaited reply does, and the task goes on.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[str]:
    """A nats-server with JetStream for this test alone; its URL."""
    server = start_nats(tmp_path / "nats")
    yield server.url
    server.stop()


@pytest.fixture
async def nc(own_nats: str) -> AsyncIterator[Client]:
    client = await connect(own_nats, name="integration-test")
    yield client
    await client.close()


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    """JetStream with Forgeline's streams declared (as every service does at start-up)."""
    context = nc.jetstream()
    await ensure_streams(context)
    return context


@pytest.fixture
def store(database_url: str) -> Iterator[Forgeline]:
    """The event store application on this test's fresh database."""
    app = open_store(database_url)
    yield app
    app.close()


def event_type_counts(database_url: str) -> Counter[str]:
    """How many events of each type (e.g. 'RequestSubmitted') the store holds."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(f"SELECT topic FROM {EVENTS_TABLE}").fetchall()
    return Counter(str(topic).rsplit(".", 1)[-1] for (topic,) in rows)


def store_positions(database_url: str) -> list[int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT notification_id FROM {EVENTS_TABLE} ORDER BY notification_id"
        ).fetchall()
    return [int(position) for (position,) in rows]


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)

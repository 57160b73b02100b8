"""Wake-ups on new events (LISTEN/NOTIFY) for the relay and the projector, against real
Postgres and NATS: a commit wakes them at once, and a lost notification or a killed listening
connection delays them by the fallback poll at most, never loses an event."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from nats.js import JetStreamContext

from broker import subjects
from broker.relay import Relay
from domain.application import EVENTS_TABLE, Forgeline
from domain.commands import RequestSpec
from domain.request import Request
from forgeline.store_wakeups import NOTIFY_TRIGGER, StoreWakeups
from projections.runner import ProjectionRunner
from tests.integration.conftest import eventually, in_thread, kill

SLOW_FALLBACK_S = 30.0  # longer than any deadline below: only a wake-up can explain a catch-up


def submit(store: Forgeline) -> uuid.UUID:
    request, run = Request.submit(
        request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        spec=RequestSpec(repo="/srv/repo", prompt="echo hi"),
        command_id=f"cmd-{uuid.uuid4()}",
    )
    store.save(request, run)
    return request.id


def projected(database_url: str, request_id: uuid.UUID) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT 1 FROM forgeline_view_requests WHERE id = %s", (request_id,)
        ).fetchone()
    return row is not None


async def events_on_stream(js: JetStreamContext) -> int:
    return (await js.stream_info(subjects.EVENTS_STREAM)).state.messages or 0


@asynccontextmanager
async def followers(
    store: Forgeline,
    js: JetStreamContext,
    database_url: str,
    wakeups: StoreWakeups,
    fallback_s: float,
) -> AsyncIterator[None]:
    """The relay and the projector as bootstrap wires them, woken by wakeups."""
    stop = asyncio.Event()
    projector = ProjectionRunner(store, database_url, idle=wakeups.idle_waiter(fallback_s))
    relay = Relay(store, js, idle=wakeups.idle_waiter(fallback_s))
    tasks = [
        asyncio.create_task(job)
        for job in (wakeups.run(stop), projector.run(stop), relay.run(stop))
    ]
    try:
        await eventually(lambda: wakeups.listening, 10, "the listener to be up")
        yield
    finally:
        stop.set()
        done, _ = await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            await kill(task)
        assert len(done) == len(tasks), "a follower did not stop within 5 s of stop"


async def caught_up(
    js: JetStreamContext, database_url: str, request_id: uuid.UUID, events: int, timeout: float
) -> float:
    """Seconds until the request is projected and `events` events are on the stream."""
    start = time.monotonic()

    async def done() -> bool:
        return projected(database_url, request_id) and await events_on_stream(js) >= events

    await eventually(done, timeout, "the relay and the projector to catch up", interval=0.01)
    return time.monotonic() - start


async def test_a_commit_wakes_the_relay_and_the_projector_at_once(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    wakeups = StoreWakeups(database_url)
    async with followers(store, js, database_url, wakeups, SLOW_FALLBACK_S):
        await asyncio.sleep(0.2)  # both idle, waiting for a wake-up
        for expected in (2, 4, 6):
            request_id = await in_thread(submit, store)
            assert await caught_up(js, database_url, request_id, expected, timeout=5) < 5


async def test_a_lost_notification_is_made_up_by_the_fallback_poll(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    """The listener is up, but the commit sends no notification (trigger disabled): the
    followers still catch up, on their fallback poll."""
    wakeups = StoreWakeups(database_url)
    async with followers(store, js, database_url, wakeups, fallback_s=0.5):
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE {EVENTS_TABLE} DISABLE TRIGGER {NOTIFY_TRIGGER}")
        try:
            request_id = await in_thread(submit, store)
            await caught_up(js, database_url, request_id, 2, timeout=10)
        finally:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(f"ALTER TABLE {EVENTS_TABLE} ENABLE TRIGGER {NOTIFY_TRIGGER}")


async def test_followers_catch_up_while_the_listening_connection_is_down_and_after(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    """The listening connection is killed (as a Postgres restart or a network cut would):
    meanwhile the followers poll quickly, and once it is back, wake-ups work again."""
    wakeups = StoreWakeups(database_url, reconnect_s=2.0)
    async with followers(store, js, database_url, wakeups, SLOW_FALLBACK_S):
        first_pid = wakeups.backend_pid
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (first_pid,))
        await eventually(lambda: not wakeups.listening, 5, "the listener to notice")
        request_id = await in_thread(submit, store)
        await caught_up(js, database_url, request_id, 2, timeout=5)
        assert not wakeups.listening, "reconnected too early to show the polling"

        await eventually(lambda: wakeups.listening, 10, "the listener to reconnect")
        assert wakeups.backend_pid != first_pid
        request_id = await in_thread(submit, store)
        await caught_up(js, database_url, request_id, 4, timeout=5)


async def test_without_the_trigger_the_followers_poll(
    js: JetStreamContext, store: Forgeline, database_url: str, monkeypatch: Any
) -> None:
    """A role that cannot create the trigger (not the table's owner): polling, as before."""
    monkeypatch.setattr("forgeline.store_wakeups.install_notify_trigger", lambda url: False)
    wakeups = StoreWakeups(database_url)
    stop = asyncio.Event()
    projector = ProjectionRunner(store, database_url, idle=wakeups.idle_waiter(SLOW_FALLBACK_S))
    tasks = [asyncio.create_task(wakeups.run(stop)), asyncio.create_task(projector.run(stop))]
    try:
        request_id = await in_thread(submit, store)
        await eventually(lambda: projected(database_url, request_id), 5, "the projector")
        assert not wakeups.listening
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            await kill(task)

"""The relay against real Postgres and JetStream: every store position on FORGELINE_EVENTS once.

JetStream's Nats-Msg-Id dedupe (1 h window) would silently swallow a republish, yet past the
window a republish is a duplicate for every consumer. So besides reading the stream, each test
listens to the events' subjects with a plain NATS subscription, which sees every publish the
relay makes, deduplicated or not: exactly-once must come from the relay's position tracking.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError
from nats.aio.client import Client
from nats.js import JetStreamContext

from broker import subjects
from broker.connection import connect
from broker.relay import Relay
from broker.streams import ensure_streams
from domain.application import Forgeline
from domain.commands import RequestSpec
from domain.request import Request
from forgeline.bootstrap import open_store
from forgeline.embedded import start_nats
from tests.integration.conftest import eventually, in_thread, kill, store_positions


def submit_many(app: Forgeline, count: int, per_save: int = 50) -> None:
    """Saves `count` requests with their first runs (two events each), `per_save` at a time."""
    for start in range(0, count, per_save):
        aggregates: list[Any] = []
        for i in range(start, min(count, start + per_save)):
            request, run = Request.submit(
                request_id=uuid.uuid4(),
                run_id=uuid.uuid4(),
                spec=RequestSpec(repo="/srv/repo", prompt=f"echo {i}"),
                command_id=f"cmd-{i}",
            )
            aggregates += [request, run]
        app.save(*aggregates)


def make_gap(app: Forgeline) -> None:
    """A write that loses a race leaves a hole in the notification ids (the sequence moved)."""
    request, run = Request.submit(
        request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        spec=RequestSpec(repo="/srv/repo", prompt="echo gap"),
        command_id="cmd-gap",
    )
    app.save(request, run)
    first, second = app.get_run(run.id), app.get_run(run.id)
    first.start_provisioning("worker-a")
    second.start_provisioning("worker-b")
    app.save(first)
    with pytest.raises(IntegrityError):
        app.save(second)


async def stream_messages(js: JetStreamContext) -> list[dict[str, Any]]:
    """Every message on FORGELINE_EVENTS in stream order, with its subject and Nats-Msg-Id."""
    last_seq = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq or 0
    messages = []
    for seq in range(1, last_seq + 1):
        msg = await js.get_msg(subjects.EVENTS_STREAM, seq=seq)
        envelope = json.loads(msg.data or b"{}")
        envelope["_subject"] = msg.subject
        envelope["_msg_id"] = (msg.headers or {}).get("Nats-Msg-Id")
        messages.append(envelope)
    return messages


async def stream_count(js: JetStreamContext) -> int:
    return (await js.stream_info(subjects.EVENTS_STREAM)).state.messages or 0


async def assert_exactly_once(
    js: JetStreamContext, database_url: str, published: PublishLog
) -> None:
    positions = await in_thread(store_positions, database_url)
    attempts = await published.settled()
    republished = sorted(p for p, n in Counter(attempts).items() if n > 1)
    assert not republished, f"{len(republished)} positions published twice: {republished[:10]}"
    assert sorted(attempts) == positions
    messages = await stream_messages(js)
    stored = [m["position"] for m in messages]
    duplicates = sorted(p for p, n in Counter(stored).items() if n > 1)
    assert not duplicates, f"positions stored twice: {duplicates[:10]}"
    assert set(stored) == set(positions), "positions missing from the stream"
    assert stored == positions, "the stream is not in store order"
    for message in messages:
        assert message["_msg_id"] == str(message["position"]) == message["id"]
        assert message["_subject"] == subjects.event_subject(
            message["aggregate"], message["type"].split(".")[2]
        )


class PublishLog:
    """Every event message any relay published, as a plain NATS subscriber receives them."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self.positions: list[int] = []

    async def start(self) -> None:
        async def record(msg: Any) -> None:
            self.positions.append(int(json.loads(msg.data)["position"]))

        await self._nc.subscribe(subjects.EVENTS_SUBJECTS, cb=record)
        await self._nc.flush()

    async def settled(self) -> list[int]:
        """What was published, once the server delivered everything sent before this call."""
        await self._nc.flush()
        return list(self.positions)


@pytest.fixture
async def published(nc: Client, js: JetStreamContext) -> PublishLog:
    log = PublishLog(nc)
    await log.start()
    return log


@pytest.fixture
def relay_js(js: JetStreamContext, published: PublishLog) -> JetStreamContext:
    return js


@contextlib.asynccontextmanager
async def relay_process(url: str, database_url: str, **kwargs: Any) -> AsyncIterator[Relay]:
    """A Relay with process state of its own: its own store application and NATS connection."""
    app = await in_thread(open_store, database_url)
    nc: Client = await connect(url, name="relay-under-test")
    try:
        yield Relay(app, nc.jetstream(), **kwargs)
    finally:
        await nc.close()  # like a process exit: nothing this relay sent arrives later
        app.close()


async def run_until(relay: Relay, js: JetStreamContext, at_least: int) -> int:
    """Runs the relay until the stream holds `at_least` messages, then kills its task abruptly."""
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    deadline = time.monotonic() + 15
    try:
        while (count := await stream_count(js)) < at_least:
            assert not task.done(), "the relay stopped on its own"
            assert time.monotonic() < deadline, f"the relay is stuck at {count} messages"
            await asyncio.sleep(0.001)
    finally:
        await kill(task)  # a crash, not a clean stop: wherever the relay was in its batch
    return await stream_count(js)


async def test_relay_killed_midway_and_restarted_publishes_each_position_once(
    own_nats: str,
    relay_js: JetStreamContext,
    store: Forgeline,
    database_url: str,
    published: PublishLog,
) -> None:
    await in_thread(submit_many, store, 150)
    await in_thread(make_gap, store)
    await in_thread(submit_many, store, 150)
    positions = await in_thread(store_positions, database_url)
    assert len(positions) == 603 and positions[-1] > len(positions)  # a hole in the ids

    async with relay_process(own_nats, database_url, batch_size=40) as first:
        stopped_at = await run_until(first, relay_js, at_least=100)
    assert stopped_at < len(positions), "the first relay finished before it was killed"

    async with relay_process(own_nats, database_url, batch_size=40) as second:
        stop = asyncio.Event()
        task = asyncio.create_task(second.run(stop))
        await eventually(lambda: stream_count(relay_js), message="the second relay to publish")
        await eventually(
            lambda: _count_is(relay_js, len(positions)), message="every position published"
        )
        stop.set()
        await task

    await assert_exactly_once(relay_js, database_url, published)


async def _count_is(js: JetStreamContext, expected: int) -> bool:
    count = await stream_count(js)
    assert count <= expected, f"{count} messages for {expected} events: republished"
    return count == expected


async def test_relay_restarted_between_batches_continues_where_it_stopped(
    own_nats: str,
    relay_js: JetStreamContext,
    store: Forgeline,
    database_url: str,
    published: PublishLog,
) -> None:
    await in_thread(submit_many, store, 100)
    async with relay_process(own_nats, database_url, batch_size=30) as first:
        assert [await first.publish_batch() for _ in range(3)] == [30, 30, 30]
    async with relay_process(own_nats, database_url, batch_size=30) as second:
        assert await second.tracked_position() == 90
        batches = [await second.publish_batch() for _ in range(5)]
    assert batches == [30, 30, 30, 20, 0]
    await assert_exactly_once(relay_js, database_url, published)


@pytest.mark.parametrize("loss", ["deleted", "purged", "stale"])
async def test_relay_whose_saved_position_is_lost_does_not_republish(
    own_nats: str,
    relay_js: JetStreamContext,
    store: Forgeline,
    database_url: str,
    published: PublishLog,
    loss: str,
) -> None:
    """The KV position is gone (or behind, as after a crash between publish and save)."""
    await in_thread(submit_many, store, 60)
    async with relay_process(own_nats, database_url, batch_size=50) as first:
        while await first.publish_batch():
            pass
    last = (await in_thread(store_positions, database_url))[-1]
    kv = await relay_js.key_value(subjects.RELAY_BUCKET)
    if loss == "deleted":
        await kv.delete("position")
    elif loss == "purged":
        await kv.purge("position")
    else:
        await kv.put("position", b"10")

    async with relay_process(own_nats, database_url, batch_size=50) as second:
        assert await second.tracked_position() == last  # taken from the stream's last message
        assert await second.publish_batch() == 0

    assert await stream_count(relay_js) == 120
    # New events still flow, from the right place.
    await in_thread(submit_many, store, 5)
    async with relay_process(own_nats, database_url, batch_size=50) as third:
        assert await third.publish_batch() == 10
    await assert_exactly_once(relay_js, database_url, published)


async def test_relay_follows_concurrent_writes_across_several_crashes(
    own_nats: str,
    relay_js: JetStreamContext,
    store: Forgeline,
    database_url: str,
    published: PublishLog,
) -> None:
    """Writers keep saving while relay processes are killed and replaced, four times."""
    done = threading.Event()

    def write() -> None:
        try:
            submit_many(store, 200, per_save=4)
            make_gap(store)
            submit_many(store, 40, per_save=4)
        finally:
            done.set()

    writer = asyncio.create_task(asyncio.to_thread(write))
    for crash in range(1, 5):
        async with relay_process(own_nats, database_url, batch_size=25) as relay:
            await run_until(relay, relay_js, at_least=60 * crash)
    await writer
    assert done.is_set()
    total = len(await in_thread(store_positions, database_url))
    async with relay_process(own_nats, database_url, batch_size=25) as last:
        stop = asyncio.Event()
        task = asyncio.create_task(last.run(stop))
        await eventually(lambda: _count_is(relay_js, total), message="every position published")
        stop.set()
        await task
    await assert_exactly_once(relay_js, database_url, published)


async def test_relay_goes_on_after_the_server_lost_a_batch_it_published(
    tmp_path: Path, store: Forgeline, database_url: str
) -> None:
    """nats-server dies with a batch in its socket, unacknowledged; once a new server runs on
    the same store, the relay must publish that batch and everything after it."""
    store_dir = tmp_path / "nats"
    server = start_nats(store_dir)
    port = int(server.url.rsplit(":", 1)[1])
    pid = int((store_dir / "nats.pid").read_text())
    watcher: Client = await connect(server.url, name="watcher")
    relay_nc: Client = await connect(server.url, name="relay-under-test")
    relay_app = await in_thread(open_store, database_url)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        js = watcher.jetstream()
        await ensure_streams(js)
        await in_thread(submit_many, store, 10)
        task = asyncio.create_task(Relay(relay_app, relay_nc.jetstream()).run(stop))
        await eventually(lambda: _count_is(js, 20), message="the first batch published")

        os.kill(pid, signal.SIGSTOP)  # the server hangs: it reads nothing, acks nothing
        sent = relay_nc.stats["out_msgs"]
        await in_thread(submit_many, store, 10)
        await eventually(
            lambda: relay_nc.stats["out_msgs"] >= sent + 20 and relay_nc.pending_data_size == 0,
            message="the relay to send its next batch",
        )
        os.kill(pid, signal.SIGKILL)  # ... and dies with that batch unread
        server.stop()
        server = start_nats(store_dir, port=port)
        await eventually(lambda: relay_nc.is_connected and watcher.is_connected, timeout=15)

        await in_thread(submit_many, store, 5)
        total = len(await in_thread(store_positions, database_url))
        # A relay should give up on lost acks within a few seconds and publish again.
        await eventually(
            lambda: _count_is(js, total), timeout=12, message="every position published"
        )
        stop.set()
        await asyncio.wait_for(task, 10)
        stored = [m["position"] for m in await stream_messages(js)]
        assert stored == await in_thread(store_positions, database_url)
    finally:
        stop.set()
        if task is not None:
            await kill(task)
        await relay_nc.close()
        await watcher.close()
        relay_app.close()
        server.stop()


async def _bucket_position(js: JetStreamContext) -> int:
    entry = await (await js.key_value(subjects.RELAY_BUCKET)).get("position")
    return int(entry.value or b"0")


async def test_relay_saves_its_bucket_position_at_most_every_interval_and_when_it_stops(
    own_nats: str,
    relay_js: JetStreamContext,
    store: Forgeline,
    database_url: str,
    published: PublishLog,
) -> None:
    """The bucket copy lags under load (a save is a round trip); the stream never does, and a
    relay that stops leaves the bucket at its last position."""
    await in_thread(submit_many, store, 60)
    positions = await in_thread(store_positions, database_url)
    async with relay_process(own_nats, database_url, batch_size=30, save_every_s=3600) as relay:
        assert [await relay.publish_batch() for _ in range(4)] == [30, 30, 30, 30]
        assert await _bucket_position(relay_js) == positions[29]  # the first batch's, only
        assert await relay.tracked_position() == positions[-1]  # from the stream
        stop = asyncio.Event()
        stop.set()
        await relay.run(stop)
        assert await _bucket_position(relay_js) == positions[-1]
    await assert_exactly_once(relay_js, database_url, published)

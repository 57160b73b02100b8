"""The relay: publishes every stored event, in store order, to FORGELINE_EVENTS.

Postgres is the outbox. Each event is published with Nats-Msg-Id = its store position, so a
publish retried inside the dedupe window is stored once. Beyond the window, exactly-once comes
from the relay's tracked position: the larger of the one it saved in the FORGELINE_RELAY bucket
and the position of the last message the stream holds, so a crash between publishing and
saving the position never republishes. The stream's last message is the position's true
record; the bucket's copy (saved at most every `save_every_s`, and when the relay stops)
serves when the stream lost its messages (purged, or aged out by its limits).

It looks at the store again when `idle` (given by the composition root: a wait for the LISTEN
wake-ups of forgeline/store_wakeups.py, with a slow poll as a fallback) returns; without it, it
polls every `idle_wait_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
from eventsourcing.persistence import Notification
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from broker import envelope, subjects
from domain.application import Forgeline, aggregate_name, event_type

log = logging.getLogger(__name__)

_POSITION_KEY = "position"


class Relay:
    def __init__(
        self,
        app: Forgeline,
        js: JetStreamContext,
        *,
        batch_size: int = 500,
        idle_wait_s: float = 0.02,
        idle: Callable[[asyncio.Event], Awaitable[None]] | None = None,
        ack_timeout_s: float = 10.0,
        save_every_s: float = 1.0,
    ) -> None:
        self._app = app
        # A save is a JetStream round trip; under load the relay publishes many small batches
        # a second, and the stream's last message records the position anyway.
        self._save_every_s = save_every_s
        self._saved: tuple[int, float] | None = None  # (position, monotonic time) last saved
        self._ack_timeout_s = ack_timeout_s
        self._js = js
        self._batch_size = batch_size
        self._idle_wait_s = idle_wait_s
        self._idle = idle
        self._position: int | None = None
        self._kv: KeyValue | None = None  # looked up once: each lookup is a stream info request

    async def tracked_position(self) -> int:
        """The last position known to be on the stream (0 when none)."""
        return await published_position(self._js, await self._bucket())

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(subjects.RELAY_BUCKET)
        return self._kv

    async def save_position(self, *, unless_saved_within_s: float = 0.0) -> None:
        """Saves the position in the bucket, unless it was saved that recently (or is)."""
        if self._position is None:
            return
        now = time.monotonic()
        if self._saved is not None and (
            self._saved[0] == self._position or now - self._saved[1] < unless_saved_within_s
        ):
            return
        kv = await self._bucket()
        await kv.put(_POSITION_KEY, str(self._position).encode())
        self._saved = (self._position, now)

    async def publish_batch(self) -> int:
        """Publishes the next batch of stored events; returns how many it published."""
        if self._position is None:
            self._position = await self.tracked_position()
        notifications: Sequence[Notification] = await anyio.to_thread.run_sync(
            lambda: self._app.recorder.select_notifications(
                start=self._position, limit=self._batch_size, inclusive_of_start=False
            )
        )
        if not notifications:
            return 0
        acks = []
        for notification in notifications:
            event = self._app.mapper.to_domain_event(notification)
            subject = subjects.event_subject(aggregate_name(event), event_type(event))
            payload = envelope.encode(envelope.envelope(notification.id, event))
            acks.append(
                await self._js.publish_async(
                    subject,
                    payload,
                    stream=subjects.EVENTS_STREAM,
                    headers={"Nats-Msg-Id": str(notification.id)},
                )
            )
        # A server that died holding the batch never acknowledges it: give up and publish
        # again (the same Nats-Msg-Ids) rather than wait forever.
        await asyncio.wait_for(asyncio.gather(*acks), self._ack_timeout_s)
        self._position = notifications[-1].id
        await self.save_position(unless_saved_within_s=self._save_every_s)
        return len(notifications)

    async def run(self, stop: asyncio.Event) -> None:
        """Publishes until stop is set; errors are logged and retried with a pause."""
        while not stop.is_set():
            try:
                published = await self.publish_batch()
            except Exception:
                log.exception("relay: publishing failed; retrying in 1 s")
                self._position = None  # re-read the tracked position after a failure
                self._kv = None
                published = 0
                await _wait(stop, 1.0)
                continue
            if not published:
                if self._idle is not None:
                    await self._idle(stop)
                else:
                    await _wait(stop, self._idle_wait_s)
        with contextlib.suppress(Exception):  # else the next relay finds it on the stream
            await self.save_position()


async def published_position(js: JetStreamContext, kv: KeyValue | None = None) -> int:
    """How far the relay got (0 when nowhere): the position of the last message on the
    stream, or the bucket copy's where that is further (the stream lost its messages)."""
    kv = kv or await js.key_value(subjects.RELAY_BUCKET)
    saved = 0
    try:
        entry = await kv.get(_POSITION_KEY)
        saved = int(entry.value or b"0")
    except KeyNotFoundError:
        pass
    return max(saved, await last_position_on_stream(js))


async def last_position_on_stream(js: JetStreamContext) -> int:
    """The store position of the last event on FORGELINE_EVENTS (0 when it holds none): how
    far the relay got, whatever its bucket says."""
    info = await js.stream_info(subjects.EVENTS_STREAM)
    if not info.state.last_seq:
        return 0
    try:
        msg = await js.get_msg(subjects.EVENTS_STREAM, seq=info.state.last_seq)
    except NotFoundError:
        return 0
    return int(json.loads(msg.data or b"{}").get("position", 0))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

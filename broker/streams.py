"""Stream declarations: created or updated in code at start-up, never by hand."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError, ServiceUnavailableError

from broker import subjects

log = logging.getLogger(__name__)

# JetStream not answering yet: a cluster electing its leaders, a server still starting.
_NOT_READY = (NatsTimeoutError, NoRespondersError, ServiceUnavailableError)

DAY = 86_400.0


@dataclass(frozen=True)
class StreamSettings:
    replicas: int = 1
    command_dedupe_window_s: float = 3_600.0
    event_dedupe_window_s: float = 3_600.0
    log_max_age_s: float = 14 * DAY
    dead_letter_max_age_s: float = 30 * DAY


def stream_configs(settings: StreamSettings) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=subjects.COMMANDS_STREAM,
            subjects=[subjects.COMMANDS_SUBJECTS],
            # A work queue: a command is gone once a handler acked it after its commit.
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=settings.command_dedupe_window_s,
            num_replicas=settings.replicas,
        ),
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.EVENTS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=settings.event_dedupe_window_s,
            num_replicas=settings.replicas,
        ),
        StreamConfig(
            name=subjects.LOGS_STREAM,
            subjects=[subjects.LOGS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.log_max_age_s,
            duplicate_window=120.0,
            num_replicas=settings.replicas,
        ),
        StreamConfig(
            # Messages a consumer gave up on, with why (broker/dead_letters.py).
            name=subjects.DEAD_LETTERS_STREAM,
            subjects=[subjects.DEAD_LETTERS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.dead_letter_max_age_s,
            duplicate_window=3_600.0,
            num_replicas=settings.replicas,
        ),
    ]


async def ensure_streams(
    js: JetStreamContext, settings: StreamSettings | None = None, *, ready_within_s: float = 60.0
) -> None:
    """Creates the streams and the relay's bucket, or updates them to the declared config.
    Waits (with backoff) up to ready_within_s for a JetStream that does not answer yet."""
    settings = settings or StreamSettings()
    deadline = time.monotonic() + ready_within_s
    delay = 0.2
    while True:
        try:
            await _declare(js, settings)
            return
        except _NOT_READY as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "JetStream is not ready (%s); declaring the streams again in %.1f s",
                type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _declare(js: JetStreamContext, settings: StreamSettings) -> None:
    for config in stream_configs(settings):
        try:
            await js.stream_info(config.name or "")
        except NotFoundError:
            await js.add_stream(config)
        else:
            await js.update_stream(config)
    await js.create_key_value(
        KeyValueConfig(bucket=subjects.RELAY_BUCKET, history=1, replicas=settings.replicas)
    )

"""Pull consumers with manual acknowledgement: ack after the work is committed, never before.

A batch handler takes a whole pull batch and says, per message, how it went: done (ack), failed
(the message comes back after a delay, nak, up to max_deliver times), or undeliverable (a
message that cannot be decoded is terminated at once, since retrying cannot help it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

log = logging.getLogger(__name__)


class Undeliverable(Exception):
    """Raised by a handler for a message no retry can help (bad payload)."""


def durable_config(
    durable: str,
    filter_subjects: list[str],
    *,
    ack_wait_s: float = 30.0,
    max_deliver: int = 10,
    max_ack_pending: int = 1_000,
) -> ConsumerConfig:
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
    )
    if len(filter_subjects) == 1:
        config.filter_subject = filter_subjects[0]
    else:
        config.filter_subjects = filter_subjects
    return config


# None: done (ack); Undeliverable: terminate; any other exception: redeliver after a delay.
Outcome = Exception | None
BatchHandler = Callable[[Sequence[Msg]], Awaitable[list[Outcome]]]


async def consume_batches(
    js: JetStreamContext,
    stream: str,
    config: ConsumerConfig,
    handle: BatchHandler,
    stop: asyncio.Event,
    *,
    batch: int = 100,
    retry_delay_s: float = 1.0,
) -> None:
    """Fetches up to batch messages (what is there: a fetch does not wait to fill a batch) and
    hands them to handle at once, in stream order, until stop is set; settles each message
    by its outcome once handle returned."""
    await js.add_consumer(stream, config)
    sub = await js.pull_subscribe_bind(durable=config.durable_name or "", stream=stream)
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception:
                log.exception("fetch from %s failed; retrying", stream)
                await asyncio.sleep(retry_delay_s)
                continue
            try:
                outcomes = await handle(msgs)
            except Exception as exc:
                log.exception("batch handler failed on %s; will be redelivered", stream)
                outcomes = [exc] * len(msgs)
            await asyncio.gather(
                *(
                    settle(msg, outcome, retry_delay_s)
                    for msg, outcome in zip(msgs, outcomes, strict=True)
                )
            )
    finally:
        await sub.unsubscribe()


async def settle(msg: Msg, outcome: Outcome, retry_delay_s: float) -> None:
    """Acks, terminates or naks one message as its outcome says."""
    if outcome is None:
        await msg.ack_sync()
    elif isinstance(outcome, Undeliverable):
        log.error("terminating undeliverable message on %s: %s", msg.subject, outcome)
        await msg.term()
    else:
        await msg.nak(delay=retry_delay_s)

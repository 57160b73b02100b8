"""Pull consumers with manual acknowledgement: ack after the work is committed, never before.

A handler (one message at a time, or a batch handler saying per message how it went) that
fails gets its message back after an exponential backoff with jitter (nak with a delay), up
to `max_deliver` deliveries; a message that fails its last one, or that the handler refuses as
undeliverable (bad payload: retrying cannot help), goes to the dead-letter stream with why
(broker/dead_letters.py) and is terminated. Acks and naks that fail (the broker away) are
logged, not raised: the message comes back and is handled again, idempotently. The server is
told no limit of its own (max_deliver -1): a message whose handler never returns (it hangs,
or its process dies on it) is counted here too, and dead-lettered before it is handled once
more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from broker.dead_letters import dead_letter
from broker.retry import backoff_s

log = logging.getLogger(__name__)


class Undeliverable(Exception):
    """Raised by a handler for a message no retry can help (bad payload)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_deliver: int = 10  # deliveries before a failing message is dead-lettered
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # Failures of the infrastructure (the store or the broker away): retried with backoff,
    # never dead-lettered for them, so that an outage does not empty the queues into the
    # dead letters; only `hung_deliveries` deliveries in all (hours at the backoff's cap) do.
    transient: tuple[type[BaseException], ...] = ()
    hung_deliveries: int = 200


def durable_config(
    durable: str,
    filter_subjects: list[str],
    *,
    ack_wait_s: float = 30.0,
    max_ack_pending: int = 1_000,
) -> ConsumerConfig:
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=-1,  # counted by settle(), which dead-letters instead of dropping
        max_ack_pending=max_ack_pending,
    )
    if len(filter_subjects) == 1:
        config.filter_subject = filter_subjects[0]
    else:
        config.filter_subjects = filter_subjects
    return config


Handler = Callable[[Msg], Awaitable[None]]
# None: done (ack); Undeliverable: dead-lettered at once; any other exception: redelivered
# after a backoff, dead-lettered after its last delivery.
Outcome = Exception | None
BatchHandler = Callable[[Sequence[Msg]], Awaitable[list[Outcome]]]

Prepared = TypeVar("Prepared")


@dataclass(frozen=True)
class TwoStepBatchHandler(Generic[Prepared]):
    """A batch handler in two steps, so that consume_batches can overlap them: prepare (on
    the event loop: decoding, say) may run while the batch before is still being decided;
    decide (the decision and its commit) runs only once the batch before's decide returned,
    in stream order. Each outcome, one per message given to prepare, is what decide returns.

    A batch's prepare and decide run in the same task, one after the other: what prepare
    enters (a span made current) decide can exit. decide is not called when prepare raised,
    nor when the consumer is cancelled in between."""

    prepare: Callable[[Sequence[Msg]], Awaitable[Prepared]]
    decide: Callable[[Prepared], Awaitable[list[Outcome]]]


async def _as_they_are(msgs: Sequence[Msg]) -> Sequence[Msg]:
    return msgs


def _two_step(handle: BatchHandler | TwoStepBatchHandler[Any]) -> TwoStepBatchHandler[Any]:
    """A one-step batch handler as a two-step one: nothing to prepare, all of it decided."""
    if isinstance(handle, TwoStepBatchHandler):
        return handle
    return TwoStepBatchHandler(prepare=_as_they_are, decide=handle)


async def consume(
    js: JetStreamContext,
    stream: str,
    config: ConsumerConfig,
    handle: Handler,
    stop: asyncio.Event,
    *,
    batch: int = 1,
    retry: RetryPolicy | None = None,
) -> None:
    """Fetches and handles messages one at a time, in stream order, until stop is set."""
    policy = retry or RetryPolicy()

    async def one_by_one(msgs: Sequence[Msg]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for msg in msgs:
            try:
                await handle(msg)
            except Exception as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
            # Settled before the next one is handled: order and acks as one at a time. The
            # ack is not waited for (handlers are idempotent: a lost one is a redelivery).
            await settle(js, msg, outcomes[-1], policy, confirmed=False)
        return outcomes

    await _consume(js, stream, config, one_by_one, stop, batch=batch, retry=policy)


async def consume_batches(
    js: JetStreamContext,
    stream: str,
    config: ConsumerConfig,
    handle: BatchHandler | TwoStepBatchHandler[Any],
    stop: asyncio.Event,
    *,
    # 250: what a batch costs whatever its size (a thread hop, a lookup, a commit) spread
    # thinner than at 100; three batches out at once (settling, handled, fetched) stay
    # under durable_config's max_ack_pending.
    batch: int = 250,
    retry: RetryPolicy | None = None,
) -> None:
    """Fetches up to batch messages (what is there: a fetch does not wait to fill a batch) and
    hands them to handle at once, in stream order, until stop is set; settles each message
    by its outcome once handle returned.

    Pipelined, one batch deep: the next batch is fetched (and, with a TwoStepBatchHandler,
    prepared) while handle decides this one, and this one is settled while handle decides
    the next. Batches are still decided one at a time, in stream order (a batch's decide, or
    a one-step handle, starts once the one before it returned), and a message is still acked
    only after its batch's decide returned its outcome (after the commit)."""
    retry = retry or RetryPolicy()
    steps = _two_step(handle)
    sub = await _subscribe(js, stream, config)
    batches: set[asyncio.Task[None]] = set()
    previous_handled: asyncio.Event | None = None
    try:
        while not stop.is_set():
            msgs = await _fetch(js, sub, stream, batch, retry)
            if not msgs:
                continue
            handled = asyncio.Event()
            task = asyncio.create_task(
                _handle_and_settle(js, stream, steps, msgs, retry, previous_handled, handled)
            )
            batches.add(task)
            task.add_done_callback(batches.discard)
            if previous_handled is not None:
                # At most one batch waits behind the one being handled: fetching further
                # ahead would only hold messages that another worker could take.
                await previous_handled.wait()
            previous_handled = handled
        # Stopping: what was fetched is handled and settled, not left to the ack wait.
        await asyncio.gather(*batches)
    finally:
        for task in list(batches):
            task.cancel()
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _handle_and_settle(
    js: JetStreamContext,
    stream: str,
    handle: TwoStepBatchHandler[Prepared],
    msgs: Sequence[Msg],
    retry: RetryPolicy,
    after: asyncio.Event | None,
    handled: asyncio.Event,
) -> None:
    """Prepares msgs at once (the batch before may still be deciding: that is the overlap),
    decides them once after is set (the batch before decided), sets handled, settles them."""
    try:
        failure: Exception | None = None
        try:
            prepared = await handle.prepare(msgs)
        except Exception as exc:
            failure = exc
        if after is not None:
            # Even when prepare failed: the batch's naks are not sent before the batch
            # before it committed, and the batch behind it waits its turn as before.
            await after.wait()
        if failure is None:
            try:
                outcomes = await handle.decide(prepared)
            except Exception as exc:
                failure = exc
        if failure is not None:
            log.exception(
                "batch handler failed on %s; will be redelivered", stream, exc_info=failure
            )
            outcomes = [failure] * len(msgs)
    finally:
        handled.set()
    failed = []
    for msg, outcome in zip(msgs, outcomes, strict=True):
        if outcome is None:
            # In turn, not a task each: an unconfirmed ack is only buffered for the socket
            # (a task per message was 4% of the command handler's CPU).
            await settle(js, msg, outcome, retry, confirmed=False)
        else:
            failed.append((msg, outcome))
    await asyncio.gather(*(settle(js, m, o, retry, confirmed=False) for m, o in failed))


async def _subscribe(
    js: JetStreamContext, stream: str, config: ConsumerConfig
) -> JetStreamContext.PullSubscription:
    await js.add_consumer(stream, config)  # creates it, or updates it to the declared config
    return await js.pull_subscribe_bind(durable=config.durable_name or "", stream=stream)


async def _fetch(
    js: JetStreamContext,
    sub: JetStreamContext.PullSubscription,
    stream: str,
    batch: int,
    retry: RetryPolicy,
) -> list[Msg]:
    """The next messages to handle ([] when none came within a second), without those whose
    deliveries ran out: those are dead-lettered here."""
    try:
        fetched = await sub.fetch(batch, timeout=1.0)
    except (TimeoutError, NatsTimeoutError):
        return []
    except Exception:
        log.exception("fetch from %s failed; retrying", stream)
        await asyncio.sleep(retry.backoff_base_s)
        return []
    msgs = []
    for msg in fetched:
        deliveries = msg.metadata.num_delivered
        if deliveries > retry.hung_deliveries:
            # Its handler never got through the earlier deliveries (hung, its process died
            # on it, or the infrastructure was away all that time).
            await _give_up(js, msg, f"not handled in {deliveries - 1} deliveries")
        else:
            msgs.append(msg)
    return msgs


async def _consume(
    js: JetStreamContext,
    stream: str,
    config: ConsumerConfig,
    handle: BatchHandler,
    stop: asyncio.Event,
    *,
    batch: int,
    retry: RetryPolicy,
) -> None:
    """One batch at a time: handle settles each message itself (consume)."""
    sub = await _subscribe(js, stream, config)
    try:
        while not stop.is_set():
            msgs = await _fetch(js, sub, stream, batch, retry)
            if not msgs:
                continue
            try:
                await handle(msgs)
            except Exception as exc:
                log.exception("handler failed on %s; will be redelivered", stream)
                await asyncio.gather(*(settle(js, msg, exc, retry) for msg in msgs))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def settle(
    js: JetStreamContext,
    msg: Msg,
    outcome: Outcome,
    retry: RetryPolicy,
    *,
    confirmed: bool = True,
) -> None:
    """Acks, dead-letters or naks one message as its outcome says. confirmed: an ack waits for
    the server's reply; else it is sent and not waited for (a batch of 100 acks is then not
    100 round trips): an ack lost on the way (the broker away) brings the message back after
    its ack wait, handled again idempotently, as when a confirmed ack times out."""
    try:
        if outcome is None:
            if confirmed:
                await msg.ack_sync()
            else:
                await msg.ack()
        elif isinstance(outcome, Undeliverable):
            await _give_up(js, msg, f"undeliverable: {outcome}")
        else:
            deliveries = msg.metadata.num_delivered
            if deliveries >= retry.max_deliver and not isinstance(outcome, retry.transient):
                reason = f"failed {deliveries} times; last: {type(outcome).__name__}: {outcome}"
                await _give_up(js, msg, reason)
                return
            delay = backoff_s(deliveries, base_s=retry.backoff_base_s, cap_s=retry.backoff_max_s)
            log.error(
                "handler failed on %s (delivery %d): %s: %s; redelivered in %.1f s",
                msg.subject,
                deliveries,
                type(outcome).__name__,
                outcome,
                delay,
            )
            await msg.nak(delay=delay)
    except (NatsError, TimeoutError) as exc:
        # The broker is away (restart, leader election): the message comes back after its
        # ack wait and is handled again, idempotently. Not raised: that would end the worker.
        log.warning(
            "could not settle a message of %s (%s); it will be redelivered", msg.subject, exc
        )


async def _give_up(js: JetStreamContext, msg: Msg, reason: str) -> None:
    log.error("dead-lettering a message of %s: %s", msg.subject, reason)
    try:
        await dead_letter(js, msg, reason)
    except Exception:
        # Not terminated: it comes back and is given up on again then.
        log.exception("could not dead-letter a message of %s; retrying later", msg.subject)
        with contextlib.suppress(NatsError, TimeoutError):
            await msg.nak(delay=5.0)
        return
    await msg.term()

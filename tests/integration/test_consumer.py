"""The batch consumer against real JetStream: pipelined (the next batch is fetched while one
is handled, a batch is settled while the next is handled), yet the handler sees one batch at
a time, in stream order, and each message is settled once, by its outcome."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker import dead_letters, subjects
from broker.consumer import (
    BatchHandler,
    Outcome,
    TwoStepBatchHandler,
    Undeliverable,
    consume_batches,
    durable_config,
)
from tests.integration.conftest import eventually


async def published(js: JetStreamContext, count: int) -> None:
    acks = [
        await js.publish_async(
            subjects.command_subject("submit"), str(i).encode(), stream=subjects.COMMANDS_STREAM
        )
        for i in range(count)
    ]
    await asyncio.gather(*acks)


async def consumed_until_settled(
    js: JetStreamContext, durable: str, handle: BatchHandler | TwoStepBatchHandler[Any]
) -> None:
    """Runs consume_batches (batches of 50) until every message is settled, then stops it."""
    stop = asyncio.Event()
    config = durable_config(durable, [subjects.COMMANDS_SUBJECTS])
    consumer = asyncio.create_task(
        consume_batches(js, subjects.COMMANDS_STREAM, config, handle, stop, batch=50)
    )

    async def all_settled() -> bool:
        info = await js.consumer_info(subjects.COMMANDS_STREAM, durable)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    try:
        await eventually(all_settled, 20, "every message settled")
    finally:
        stop.set()
        await asyncio.wait_for(consumer, 10)


async def test_batches_are_handled_one_at_a_time_in_stream_order_and_each_settled(
    js: JetStreamContext,
) -> None:
    await published(js, 350)
    seen: list[int] = []
    handling = 0
    overlapped = False

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        nonlocal handling, overlapped
        handling += 1
        overlapped = overlapped or handling > 1
        await asyncio.sleep(0.02)  # long enough for the next fetch to come back meanwhile
        seen.extend(int(m.data) for m in msgs)
        handling -= 1
        # Every 7th refused as undeliverable: settled by its own outcome, not the batch's.
        return [Undeliverable("refused") if int(m.data) % 7 == 0 else None for m in msgs]

    await consumed_until_settled(js, "batch-test", handle)

    assert not overlapped
    assert seen == list(range(350))  # each once, in stream order
    info = await js.consumer_info(subjects.COMMANDS_STREAM, "batch-test")
    assert info.num_redelivered == 0
    assert await dead_letters.count(js) == len(range(0, 350, 7))


async def test_a_two_step_handler_prepares_the_next_batch_while_this_one_is_decided(
    js: JetStreamContext,
) -> None:
    """The next batch's prepare runs while this batch's decide is still out (each decide here
    waits for it, so the test passes only if they overlap); decides stay one at a time, in
    stream order, each after the batch before's; each message is settled by its own outcome."""
    await published(js, 200)
    log: list[tuple[str, int]] = []  # (step, first message of the batch)
    prepared_up_to = -1  # the last message a prepare was given
    progress = asyncio.Condition()
    deciding = 0
    decides_overlapped = False

    async def prepare(msgs: Sequence[Msg]) -> list[int]:
        nonlocal prepared_up_to
        numbers = [int(m.data) for m in msgs]
        log.append(("prepare", numbers[0]))
        async with progress:
            prepared_up_to = numbers[-1]
            progress.notify_all()
        return numbers

    async def decide(numbers: list[int]) -> list[Outcome]:
        nonlocal deciding, decides_overlapped
        deciding += 1
        decides_overlapped = decides_overlapped or deciding > 1
        log.append(("decide", numbers[0]))
        if numbers[-1] < 199:
            # Messages follow: the next batch is prepared while this one is decided, or
            # never (a prepare after this decide would time out here).
            async with progress:
                await asyncio.wait_for(progress.wait_for(lambda: prepared_up_to > numbers[-1]), 10)
        log.append(("decided", numbers[0]))
        deciding -= 1
        return [Undeliverable("refused") if n % 7 == 0 else None for n in numbers]

    await consumed_until_settled(
        js, "two-step-test", TwoStepBatchHandler(prepare=prepare, decide=decide)
    )

    assert not decides_overlapped
    firsts = [first for step, first in log if step == "decide"]
    assert len(firsts) > 1
    assert firsts == sorted(firsts) and firsts[0] == 0  # each batch once, in stream order
    assert [first for step, first in log if step == "prepare"] == firsts
    for first, later in itertools.pairwise(firsts):
        # The next batch: prepared before this one was decided, decided after it.
        assert log.index(("prepare", later)) < log.index(("decided", first))
        assert log.index(("decided", first)) < log.index(("decide", later))
    info = await js.consumer_info(subjects.COMMANDS_STREAM, "two-step-test")
    assert info.num_redelivered == 0
    assert await dead_letters.count(js) == len(range(0, 200, 7))

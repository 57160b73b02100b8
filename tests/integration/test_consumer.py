"""The batch consumer against real JetStream: pipelined (the next batch is fetched while one
is handled, a batch is settled while the next is handled), yet the handler sees one batch at
a time, in stream order, and each message is settled once, by its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker import dead_letters, subjects
from broker.consumer import Outcome, Undeliverable, consume_batches, durable_config
from tests.integration.conftest import eventually


async def published(js: JetStreamContext, count: int) -> None:
    acks = [
        await js.publish_async(
            subjects.command_subject("submit"), str(i).encode(), stream=subjects.COMMANDS_STREAM
        )
        for i in range(count)
    ]
    await asyncio.gather(*acks)


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

    stop = asyncio.Event()
    config = durable_config("batch-test", [subjects.COMMANDS_SUBJECTS])
    consumer = asyncio.create_task(
        consume_batches(js, subjects.COMMANDS_STREAM, config, handle, stop, batch=50)
    )

    async def all_settled() -> bool:
        info = await js.consumer_info(subjects.COMMANDS_STREAM, "batch-test")
        return info.num_pending == 0 and info.num_ack_pending == 0

    try:
        await eventually(all_settled, 20, "every message settled")
    finally:
        stop.set()
        await asyncio.wait_for(consumer, 10)

    assert not overlapped
    assert seen == list(range(350))  # each once, in stream order
    info = await js.consumer_info(subjects.COMMANDS_STREAM, "batch-test")
    assert info.num_redelivered == 0
    assert await dead_letters.count(js) == len(range(0, 350, 7))

"""Messages that keep failing end in FORGELINE_DEAD_LETTERS with why, after a bounded number
of deliveries spaced by a growing backoff, never to come back; operators see them at
GET /v1/dead-letters and in /metrics."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker import dead_letters, subjects
from broker.consumer import RetryPolicy, consume, durable_config
from tests.integration.conftest import eventually
from tests.integration.test_auth import (  # noqa: F401
    ADMIN_KEY,
    Start,
    bearer,
    make_key,
    start,
)


async def test_a_poison_message_is_dead_lettered_after_n_deliveries_spaced_by_backoff(
    js: JetStreamContext,
) -> None:
    delivered_at: list[float] = []

    async def always_fails(msg: Msg) -> None:
        delivered_at.append(time.monotonic())
        raise RuntimeError("the database said no")

    poison = b'{"kind": "submit", "poison": true}'
    await js.publish(subjects.command_subject("submit"), poison, stream=subjects.COMMANDS_STREAM)
    stop = asyncio.Event()
    config = durable_config("poison-test", [subjects.COMMANDS_SUBJECTS])
    policy = RetryPolicy(max_deliver=4, backoff_base_s=0.3, backoff_max_s=10)
    consumer = asyncio.create_task(
        consume(js, subjects.COMMANDS_STREAM, config, always_fails, stop, retry=policy)
    )
    try:
        await eventually(lambda: dead_letters.count(js), message="a dead letter")
        await asyncio.sleep(1.5)  # long enough for a fifth delivery, were there one
    finally:
        stop.set()
        await asyncio.wait_for(consumer, 10)

    assert len(delivered_at) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(delivered_at)]
    # Backoff 0.3 * 2^(n-1) s with jitter x0.5..1.5: at least 0.15, 0.3, 0.6 s.
    for n, gap in enumerate(gaps, start=1):
        assert gap >= 0.3 * 2 ** (n - 1) * 0.5 - 0.05, gaps
    [letter] = await dead_letters.recent(js, 10)
    assert letter["payload"] == poison.decode()
    assert letter["deliveries"] == 4 and letter["consumer"] == "poison-test"
    assert letter["reason"].startswith("failed 4 times; last: RuntimeError: the database said no")
    info = await js.stream_info(subjects.COMMANDS_STREAM)
    assert info.state.messages == 0, "the poison message is still in the work queue"


async def test_an_undecodable_command_is_dead_lettered_at_once_and_shown_to_operators(
    start: Start,  # noqa: F811
    js: JetStreamContext,
) -> None:
    async with start() as http:
        operator = await make_key(http, "operator", name="ops")
        viewer = await make_key(http, "viewer", name="watcher")
        scoped = await make_key(http, "operator", name="web ops", projects=["web"])
        garbage = f"not json {uuid.uuid4()}".encode()
        await js.publish(
            subjects.command_subject("submit"), garbage, stream=subjects.COMMANDS_STREAM
        )

        async def listed() -> list[dict[str, object]] | None:
            answer = await http.get("/v1/dead-letters", headers=bearer(operator["key"]))
            assert answer.status_code == 200, answer.text
            items: list[dict[str, object]] = answer.json()["items"]
            return items or None

        [letter] = await eventually(listed, message="the dead letter in the API")
        assert letter["payload"] == garbage.decode()
        assert letter["subject"] == "forgeline.cmd.submit"
        assert letter["deliveries"] == 1
        assert str(letter["reason"]).startswith("undeliverable: not a valid command")
        for key in (viewer, scoped):
            answer = await http.get("/v1/dead-letters", headers=bearer(key["key"]))
            assert answer.status_code == 403, (key["name"], answer.text)
        answer = await http.get("/v1/dead-letters?limit=0", headers=bearer(operator["key"]))
        assert answer.status_code == 400
        metrics = await http.get("/metrics", headers=bearer(ADMIN_KEY))
        assert "\nforgeline_dead_letters 1\n" in metrics.text

"""The command handler against real JetStream and Postgres: every command may arrive twice.

Each duplicate is published with its own Nats-Msg-Id, so JetStream stores both copies (as it
would for a client retrying past the dedupe window, or a redelivery after a lost ack); the
store must hold each fact once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import psycopg
import pytest
from nats.js import JetStreamContext

from broker import subjects
from broker.commands import AnyCommand, publish_command
from broker.consumer import consume_batches, durable_config
from domain.application import Forgeline
from domain.commands import CancelRequest, RequestSpec, RerunRequest, SubmitRequest
from domain.status import RunStatus
from forgeline.bootstrap import open_store
from handlers.commands import command_batch_handler, handle_commands
from tests.integration.conftest import event_type_counts, eventually, in_thread, kill


def submit_command(repo: str = "/srv/repo", prompt: str = "echo hi") -> SubmitRequest:
    return SubmitRequest(
        command_id=f"cmd-{uuid.uuid4()}",
        request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        spec=RequestSpec(repo=repo, prompt=prompt),
    )


async def publish_copy(js: JetStreamContext, command: AnyCommand, copy: str) -> None:
    """Publishes the command under a Nats-Msg-Id of its own, so JetStream keeps every copy."""
    ack = await js.publish(
        subjects.command_subject(command.kind),
        command.model_dump_json().encode(),
        stream=subjects.COMMANDS_STREAM,
        headers={"Nats-Msg-Id": f"{command.command_id}#{copy}"},
    )
    assert not ack.duplicate


async def publish_twice(js: JetStreamContext, command: AnyCommand) -> None:
    await publish_copy(js, command, "1")
    await publish_copy(js, command, "2")


async def consumer_state(js: JetStreamContext) -> tuple[int, int, int, int]:
    """(pending, ack pending, redelivered, ack floor stream sequence) of the command handler."""
    info = await js.consumer_info(subjects.COMMANDS_STREAM, subjects.COMMAND_HANDLER_DURABLE)
    return (
        info.num_pending or 0,
        info.num_ack_pending or 0,
        info.num_redelivered or 0,
        info.ack_floor.stream_seq if info.ack_floor else 0,
    )


async def all_handled(js: JetStreamContext) -> bool:
    """Every published command was delivered and acknowledged (or terminated)."""
    last_seq = (await js.stream_info(subjects.COMMANDS_STREAM)).state.last_seq
    pending, ack_pending, _, ack_floor = await consumer_state(js)
    return pending == 0 and ack_pending == 0 and ack_floor == last_seq


@asynccontextmanager
async def command_handler(js: JetStreamContext, app: Forgeline) -> AsyncIterator[None]:
    """The worker's command consumer (as bootstrap wires it), running until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        consume_batches(
            js,
            subjects.COMMANDS_STREAM,
            durable_config(subjects.COMMAND_HANDLER_DURABLE, [subjects.COMMANDS_SUBJECTS]),
            command_batch_handler(app),
            stop,
        )
    )
    try:
        yield
    finally:
        # The consumer notices stop only when its 1 s fetch times out; the tests leave the
        # block once every command was acknowledged, so cancelling the fetch loses nothing.
        stop.set()
        await kill(task)


async def handled(js: JetStreamContext, timeout: float = 10.0) -> None:
    await eventually(lambda: all_handled(js), timeout, "every command to be acknowledged")


async def run_status(app: Forgeline, run_id: UUID) -> RunStatus:
    return (await in_thread(app.get_run, run_id)).status


Publisher = Callable[[JetStreamContext, AnyCommand], Awaitable[None]]


async def test_submit_delivered_twice_is_recorded_once(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    command = submit_command()
    await publish_twice(js, command)
    async with command_handler(js, store):
        await handled(js)

    counts = event_type_counts(database_url)
    assert counts == {"RequestSubmitted": 1, "RunQueued": 1}
    request = await in_thread(store.get_request, command.request_id)
    assert request.run_ids == [command.run_id]
    assert request.repo == "/srv/repo"
    # A work queue: acknowledged commands are gone from the stream.
    assert (await js.stream_info(subjects.COMMANDS_STREAM)).state.messages == 0


async def test_cancel_and_rerun_delivered_twice_are_recorded_once(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    submit = submit_command()
    cancel = CancelRequest(
        command_id=f"cmd-{uuid.uuid4()}", request_id=submit.request_id, run_id=submit.run_id
    )
    rerun = RerunRequest(
        command_id=f"cmd-{uuid.uuid4()}",
        request_id=submit.request_id,
        run_id=uuid.uuid4(),
        prompt="echo again",
    )
    async with command_handler(js, store):
        await publish_twice(js, submit)
        await publish_twice(js, cancel)
        await handled(js)
        assert await run_status(store, submit.run_id) is RunStatus.CANCELLED
        await publish_twice(js, rerun)
        await handled(js)

    counts = event_type_counts(database_url)
    assert counts == {
        "RequestSubmitted": 1,
        "RunQueued": 2,  # the first run and the rerun's
        "CancelRequested": 1,
        "RunCancelled": 1,
        "RerunRequested": 1,
    }
    request = await in_thread(store.get_request, submit.request_id)
    assert request.run_ids == [submit.run_id, rerun.run_id]
    rerun_run = await in_thread(store.get_run, rerun.run_id)
    assert (rerun_run.number, rerun_run.status, rerun_run.prompt) == (
        2,
        RunStatus.QUEUED,
        "echo again",
    )


async def test_cancel_of_the_active_rerun_delivered_twice_is_recorded_once(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    submit = submit_command()
    first_cancel = CancelRequest(
        command_id=f"cmd-{uuid.uuid4()}", request_id=submit.request_id, run_id=submit.run_id
    )
    rerun = RerunRequest(
        command_id=f"cmd-{uuid.uuid4()}", request_id=submit.request_id, run_id=uuid.uuid4()
    )
    # Without run_id: a client naming only the request cancels its latest run.
    second_cancel = CancelRequest(command_id=f"cmd-{uuid.uuid4()}", request_id=submit.request_id)
    async with command_handler(js, store):
        for command in (submit, first_cancel, rerun, second_cancel):
            await publish_twice(js, command)
        await handled(js)

    counts = event_type_counts(database_url)
    assert counts["CancelRequested"] == 2
    assert counts["RunCancelled"] == 2
    assert counts["RerunRequested"] == 1
    assert await run_status(store, rerun.run_id) is RunStatus.CANCELLED


async def test_late_copy_of_a_cancel_does_not_cancel_the_rerun(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    """A cancel redelivered (lost ack, ack_wait later) after the client's rerun was handled.

    The gateway names the run that was active in the cancel; that run is the one cancelled."""
    submit = submit_command()
    cancel = CancelRequest(
        command_id=f"cmd-{uuid.uuid4()}", request_id=submit.request_id, run_id=submit.run_id
    )
    rerun = RerunRequest(
        command_id=f"cmd-{uuid.uuid4()}", request_id=submit.request_id, run_id=uuid.uuid4()
    )
    async with command_handler(js, store):
        await publish_copy(js, submit, "1")
        await publish_copy(js, cancel, "1")
        await publish_copy(js, rerun, "1")
        await publish_copy(js, cancel, "late copy")
        await handled(js)

    assert await run_status(store, submit.run_id) is RunStatus.CANCELLED
    # The user asked for one cancel, then a rerun: the rerun must stay queued.
    assert await run_status(store, rerun.run_id) is RunStatus.QUEUED
    assert event_type_counts(database_url)["CancelRequested"] == 1


async def test_rerun_refused_while_a_run_is_active_is_acknowledged_and_records_nothing(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    submit = submit_command()
    rerun = RerunRequest(
        command_id=f"cmd-{uuid.uuid4()}", request_id=submit.request_id, run_id=uuid.uuid4()
    )
    async with command_handler(js, store):
        await publish_command(js, submit)
        await publish_command(js, rerun)
        await handled(js)
        _, _, redelivered, _ = await consumer_state(js)

    assert redelivered == 0
    assert event_type_counts(database_url) == {"RequestSubmitted": 1, "RunQueued": 1}
    assert (await in_thread(store.get_request, submit.request_id)).run_ids == [submit.run_id]


async def test_duplicates_racing_on_two_workers_are_recorded_once(
    js: JetStreamContext, database_url: str
) -> None:
    """Two worker processes (two stores, one durable consumer) share the duplicated commands."""
    commands = [submit_command(prompt=f"echo {i}") for i in range(20)]
    for command in commands:
        await publish_twice(js, command)
    worker_a = await in_thread(open_store, database_url)
    worker_b = await in_thread(open_store, database_url)
    try:
        async with command_handler(js, worker_a), command_handler(js, worker_b):
            await handled(js, timeout=20)
    finally:
        worker_a.close()
        worker_b.close()

    assert event_type_counts(database_url) == {"RequestSubmitted": 20, "RunQueued": 20}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xff not json at all", id="not-json"),
        pytest.param(json.dumps({"kind": "submit", "command_id": "x"}).encode(), id="missing"),
        pytest.param(json.dumps({"kind": "explode"}).encode(), id="unknown-kind"),
    ],
)
async def test_undecodable_command_is_terminated_not_redelivered(
    js: JetStreamContext, store: Forgeline, database_url: str, payload: bytes
) -> None:
    await js.publish(subjects.command_subject("submit"), payload, stream=subjects.COMMANDS_STREAM)
    valid = submit_command()
    await publish_command(js, valid)
    async with command_handler(js, store):
        # The bad command is terminated at once (no nak with retries): the consumer's ack
        # floor passes it and the valid command behind it is handled.
        await handled(js)
        pending, ack_pending, redelivered, ack_floor = await consumer_state(js)

    assert (pending, ack_pending, redelivered, ack_floor) == (0, 0, 0, 2)
    assert event_type_counts(database_url) == {"RequestSubmitted": 1, "RunQueued": 1}


async def test_command_naming_an_unknown_request_is_terminated(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    ghost = uuid.uuid4()
    await publish_command(js, CancelRequest(command_id="cmd-ghost-cancel", request_id=ghost))
    await publish_command(
        js, RerunRequest(command_id="cmd-ghost-rerun", request_id=ghost, run_id=uuid.uuid4())
    )
    async with command_handler(js, store):
        await handled(js)
        _, _, redelivered, _ = await consumer_state(js)

    assert redelivered == 0
    assert event_type_counts(database_url) == {}


def transactions_of_requests(database_url: str) -> int:
    """How many transactions wrote the RequestSubmitted events (xmin: the writing one)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT xmin::text) FROM forgeline_events"
            " WHERE topic LIKE '%RequestSubmitted%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_backlog_is_saved_in_few_transactions_and_copies_in_it_record_nothing(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    """A backlog arrives as pull batches: copies of a command in the same batch, a cancel
    behind the submit it cancels, a copy of a command handled long before."""
    handled_before = submit_command(prompt="echo before")
    async with command_handler(js, store):
        await publish_command(js, handled_before)
        await handled(js)
    submits = [submit_command(prompt=f"echo {i}") for i in range(30)]
    cancels = [
        CancelRequest(command_id=f"cmd-{uuid.uuid4()}", request_id=s.request_id, run_id=s.run_id)
        for s in submits[:5]
    ]
    for command in [*submits, *cancels]:
        await publish_twice(js, command)
    await publish_copy(js, handled_before, "redelivered")

    async with command_handler(js, store):
        await handled(js)
        _, _, redelivered, _ = await consumer_state(js)

    assert redelivered == 0
    assert event_type_counts(database_url) == {
        "RequestSubmitted": 31,
        "RunQueued": 31,
        "CancelRequested": 5,
        "RunCancelled": 5,
    }
    for submit in submits[:5]:
        assert await run_status(store, submit.run_id) is RunStatus.CANCELLED
    for submit in submits[5:]:
        assert await run_status(store, submit.run_id) is RunStatus.QUEUED
    # 31 submits, the first alone: far fewer transactions than commands.
    assert transactions_of_requests(database_url) <= 5
    # Store order is command order (as one-by-one saves would have it): the submits' events,
    # each request's before its run's, then the cancels'.
    with psycopg.connect(database_url) as conn:
        types = [
            str(row[0]).rsplit(".", 1)[-1]
            for row in conn.execute("SELECT topic FROM forgeline_events ORDER BY notification_id")
        ]
    assert types == ["RequestSubmitted", "RunQueued"] * 31 + ["CancelRequested", "RunCancelled"] * 5


async def test_a_batch_that_loses_a_race_ends_with_every_command_applied_once(
    js: JetStreamContext, store: Forgeline, database_url: str
) -> None:
    """Another writer (a worker claiming the run) saves between the batch's load and its
    save: the batch's one transaction fails (IntegrityError) and records nothing; the
    commands go again one by one against the store."""
    first = submit_command(prompt="echo first")
    async with command_handler(js, store):
        await publish_command(js, first)
        await handled(js)
    cancel = CancelRequest(
        command_id=f"cmd-{uuid.uuid4()}", request_id=first.request_id, run_id=first.run_id
    )
    others = [submit_command(prompt=f"echo {i}") for i in range(10)]
    for command in [others[0], cancel, *others[1:]]:
        await publish_twice(js, command)

    other_writer = await in_thread(open_store, database_url)
    real_save_events = store.save_events
    raced: list[int] = []

    def save_after_a_rival(events: Any) -> None:  # the batch's save (one by one: save)
        if not raced:
            run = other_writer.get_run(first.run_id)
            run.start_provisioning("rival-worker")
            other_writer.save(run)
            raced.append(len(events))
        real_save_events(events)

    store.save_events = save_after_a_rival  # type: ignore[method-assign]
    try:
        async with command_handler(js, store):
            await handled(js)
            _, _, redelivered, _ = await consumer_state(js)
    finally:
        store.save_events = real_save_events  # type: ignore[method-assign]
        other_writer.close()

    assert raced, "the batch was never saved in one piece"
    assert redelivered == 0
    assert event_type_counts(database_url) == {
        "RequestSubmitted": 11,
        "RunQueued": 11,
        "ProvisioningStarted": 1,
        # Decided again against the claimed run: asked of the worker, not cancelled at once.
        "CancelRequested": 1,
    }
    run = await in_thread(store.get_run, first.run_id)
    assert (run.status, run.cancel_requested) == (RunStatus.PROVISIONING, True)
    for submit in others:
        assert await run_status(store, submit.run_id) is RunStatus.QUEUED


async def test_a_request_created_after_the_batch_looked_it_up_is_recorded_once(
    store: Forgeline, database_url: str
) -> None:
    """The batch learns in one query which requests do not exist yet; another worker saves
    one of them (a copy of its command) before the batch's save: the batch's transaction
    fails on the store's unique key and the commands go again one by one."""
    racing, others = submit_command(prompt="echo racing"), [submit_command() for _ in range(3)]
    other_writer = await in_thread(open_store, database_url)
    real_save_events = store.save_events
    raced: list[int] = []

    def save_after_a_rival(events: Any) -> None:  # the batch's save (one by one: save)
        if not raced:
            assert handle_commands(other_writer, [racing]) == [None]
            raced.append(len(events))
        real_save_events(events)

    store.save_events = save_after_a_rival  # type: ignore[method-assign]
    try:
        outcomes = await in_thread(handle_commands, store, [others[0], racing, *others[1:]])
    finally:
        store.save_events = real_save_events  # type: ignore[method-assign]
        other_writer.close()

    assert raced, "the batch was never saved in one piece"
    assert outcomes == [None] * 4
    assert event_type_counts(database_url) == {"RequestSubmitted": 4, "RunQueued": 4}
    request = await in_thread(store.get_request, racing.request_id)
    assert request.run_ids == [racing.run_id]

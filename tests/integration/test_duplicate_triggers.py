"""Copies of the executor's triggers (RunQueued, RunRequeued), arriving while the run runs,
after it ended, or out of order, at two workers: the run is executed once and its history
holds each fact once."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import psycopg
from nats.js import JetStreamContext

from broker import subjects
from broker.connection import connect
from broker.consumer import durable_config
from broker.streams import ensure_streams
from domain.status import RunStatus
from handlers.execution import EXECUTOR_FILTERS
from tests.integration.conftest import eventually
from tests.integration.worker_stack import (
    Services,
    event_types,
    finished,
    run_now,
    services,
    submit,
)

ONCE = ["RunQueued", "ProvisioningStarted", "WorkspaceProvisioned", "RunStarted", "RunSucceeded"]


async def stored_trigger(js: JetStreamContext, run_id: UUID) -> bytes:
    """The RunQueued message the relay published for the run."""
    sub = await js.subscribe(
        subjects.event_subject("Run", "RunQueued"),
        stream=subjects.EVENTS_STREAM,
        ordered_consumer=True,
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            if json.loads(msg.data)["aggregateid"] == str(run_id):
                return bytes(msg.data)
    finally:
        await sub.unsubscribe()


async def send_copies(js: JetStreamContext, run_id: UUID, queued: bytes, copies: int) -> None:
    """Copies of RunQueued, and a RunRequeued that never happened, as a republish past the
    dedupe window or a redelivery would bring them."""
    requeued = {**json.loads(queued), "type": "forgeline.Run.RunRequeued.v2", "version": 9}
    for n in range(copies):
        for event_type, data in (("RunQueued", queued), ("RunRequeued", json.dumps(requeued))):
            await js.publish(
                subjects.event_subject("Run", event_type),
                data.encode() if isinstance(data, str) else data,
                stream=subjects.EVENTS_STREAM,
                headers={"Nats-Msg-Id": f"copy-{run_id}-{event_type}-{n}"},
            )


async def triggers_handled(svc: Services) -> bool:
    info = await svc.js.consumer_info(subjects.EVENTS_STREAM, subjects.EXECUTOR_DURABLE)
    return info.num_pending == 0 and info.num_ack_pending == 0


def queue_rows(database_url: str, run_id: UUID) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM forgeline_run_queue WHERE run_id = %s", (run_id,)
        ).fetchone()
    return int(row[0]) if row else 0


async def test_copies_of_triggers_while_running_and_after_the_end_record_nothing(
    own_nats: str, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    async with services(
        own_nats, database_url, tmp_path / "data", workers=2, worker_slots=2
    ) as svc:
        command = await submit(svc, git_repo, f"while [ ! -e {gate} ]; do sleep 0.05; done\n")

        async def running() -> bool:
            return (await run_now(svc, command.run_id)).status is RunStatus.RUNNING

        await eventually(running, message="the run to run")
        queued = await stored_trigger(svc.js, command.run_id)
        await send_copies(svc.js, command.run_id, queued, copies=3)
        await eventually(lambda: triggers_handled(svc), message="the copies handled")
        assert (await run_now(svc, command.run_id)).attempt == 1

        gate.touch()
        run = await finished(svc, command.run_id)
        assert run.status is RunStatus.SUCCEEDED
        await send_copies(svc.js, command.run_id, queued, copies=3)
        await eventually(lambda: triggers_handled(svc), message="the late copies handled")
        await eventually(
            lambda: queue_rows(database_url, command.run_id) == 0, message="no queue row"
        )

        assert event_types(database_url, command.run_id) == ONCE
        view = await svc.views.get_run(command.run_id)
        assert view is not None
        assert (view["status"], view["attempt"], view["queue_position"]) == ("succeeded", 1, None)


async def test_a_worker_started_over_the_older_run_star_durable_narrows_it_and_runs_requests(
    own_nats: str, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    """An executor durable declared by an earlier version (one filter: every Run event) with
    messages waiting in it is updated in place, not broken: runs are executed, nothing waits."""
    nc = await connect(own_nats, name="older-worker")
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        older = durable_config(subjects.EXECUTOR_DURABLE, [subjects.event_subject("Run", "*")])
        await js.add_consumer(subjects.EVENTS_STREAM, older)
        await js.publish(
            subjects.event_subject("Run", "RunStarted"),
            b'{"aggregateid": "00000000-0000-0000-0000-000000000001"}',
            stream=subjects.EVENTS_STREAM,
        )
    finally:
        await nc.close()

    async with services(own_nats, database_url, tmp_path / "data") as svc:
        command = await submit(svc, git_repo, "echo upgraded >> README.md\n")
        run = await finished(svc, command.run_id)
        assert run.status is RunStatus.SUCCEEDED
        info = await svc.js.consumer_info(subjects.EVENTS_STREAM, subjects.EXECUTOR_DURABLE)
        assert sorted(info.config.filter_subjects or []) == EXECUTOR_FILTERS
        assert not info.config.filter_subject
        await eventually(lambda: triggers_handled(svc), message="nothing left to handle")

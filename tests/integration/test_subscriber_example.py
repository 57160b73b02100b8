"""examples/subscriber.py, run as a separate process against the real services.

The worker, relay and projector run a scenario (a run that succeeds with a patch, a rerun
that fails, a request cancelled while running) on real NATS and Postgres. The example
subscriber runs twice under one durable name and state file: the first process stops after a
few events, the second resumes. Between them they must print every store position of the
scenario exactly once, with its type, and a copy of an event republished by hand (beyond
JetStream's dedupe, as a republish after the window would be) must not be printed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from broker import subjects
from broker.commands import publish_command
from broker.connection import connect
from domain.application import EVENTS_TABLE, Forgeline
from domain.commands import CancelRequest, RequestSpec, RerunRequest, SubmitRequest
from domain.run import Run
from domain.status import RunStatus
from forgeline.bootstrap import Servers, open_store, run_services
from forgeline.settings import Settings
from tests.integration.conftest import eventually, in_thread

ROOT = Path(__file__).resolve().parents[2]
SUBSCRIBER = ROOT / "examples" / "subscriber.py"
DURABLE = "example-test"


class Subscriber:
    """One process of examples/subscriber.py; its stdout lines, as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, url: str, state: Path, *extra: str) -> Subscriber:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SUBSCRIBER),
            "--url",
            url,
            "--durable",
            DURABLE,
            "--state",
            str(state),
            *extra,
            stdout=asyncio.subprocess.PIPE,
            cwd=state.parent,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    async def wait(self, timeout: float = 30) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    def positions(self) -> list[int]:
        return [int(line.split()[0]) for line in self.lines]


@pytest.fixture
async def services(own_nats: str, database_url: str, tmp_path: Path) -> AsyncIterator[Forgeline]:
    settings = Settings(
        data_dir=tmp_path / "data",
        nats_url=own_nats,
        database_url=database_url,
        provisioner="local",
        worker_name="subscriber-test",
        shutdown_grace_s=5,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_services(
            settings,
            Servers(nats_url=own_nats, database_url=database_url),
            stop,
            roles=frozenset({"worker", "relay", "projector"}),
        )
    )
    app = await in_thread(open_store, database_url)
    try:
        yield app
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        app.close()


async def run_reaches(app: Forgeline, run_id: UUID, *statuses: RunStatus) -> Run:
    async def there() -> Run | None:
        run: Run = await in_thread(app.get_run, run_id)
        return run if run.status in statuses else None

    run: Run = await eventually(there, 30, f"run {run_id} to be {statuses}")
    return run


def stored_types(database_url: str) -> dict[int, str]:
    """position -> 'Aggregate.EventType' of every stored event."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(f"SELECT notification_id, topic FROM {EVENTS_TABLE}").fetchall()
    return {int(position): str(topic).split(":", 1)[1] for position, topic in rows}


async def scenario(js: JetStreamContext, app: Forgeline, repo: Path) -> None:
    first = SubmitRequest(
        command_id=f"cmd-{uuid.uuid4()}",
        request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        spec=RequestSpec(repo=str(repo), prompt="echo hello > hello.txt"),
    )
    await publish_command(js, first)
    assert (await run_reaches(app, first.run_id, RunStatus.SUCCEEDED)).has_patch
    rerun = RerunRequest(
        command_id=f"cmd-{uuid.uuid4()}",
        request_id=first.request_id,
        run_id=uuid.uuid4(),
        prompt="exit 3",
    )
    await publish_command(js, rerun)
    await run_reaches(app, rerun.run_id, RunStatus.FAILED)
    slow = SubmitRequest(
        command_id=f"cmd-{uuid.uuid4()}",
        request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        spec=RequestSpec(repo=str(repo), prompt="sleep 60"),
    )
    await publish_command(js, slow)
    await run_reaches(app, slow.run_id, RunStatus.RUNNING)
    cancel = CancelRequest(
        command_id=f"cmd-{uuid.uuid4()}", request_id=slow.request_id, run_id=slow.run_id
    )
    await publish_command(js, cancel)
    await run_reaches(app, slow.run_id, RunStatus.CANCELLED)


async def test_the_example_subscriber_gets_every_event_once_per_position(
    own_nats: str,
    database_url: str,
    services: Forgeline,
    git_repo: Path,
    tmp_path: Path,
) -> None:
    nc: Client = await connect(own_nats, name="subscriber-test-client")
    js = nc.jetstream()
    state = tmp_path / "subscriber.pos"
    try:
        await eventually(lambda: js.stream_info(subjects.EVENTS_STREAM), message="streams")
        first = await Subscriber.start(own_nats, state, "--count", "4")
        await scenario(js, services, git_repo)
        assert await first.wait() == 0
        assert len(first.lines) == 4

        second = await Subscriber.start(own_nats, state)
        stored = await in_thread(stored_types, database_url)
        await eventually(
            lambda: len(second.positions()) + 4 >= len(stored),
            timeout=20,
            message="the second subscriber to catch up",
        )

        # A copy of an event published again under another message id: a duplicate position.
        last_seq = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq or 0
        original = await js.get_msg(subjects.EVENTS_STREAM, seq=last_seq)
        await js.publish(
            original.subject or "",
            original.data or b"",
            stream=subjects.EVENTS_STREAM,
            headers={"Nats-Msg-Id": "republished-by-hand"},
        )

        async def all_acked() -> bool:
            info = await js.consumer_info(subjects.EVENTS_STREAM, DURABLE)
            return info.delivered.stream_seq == last_seq + 1 and info.num_ack_pending == 0

        await eventually(all_acked, timeout=10, message="the duplicate to be acknowledged")
        assert await second.stop() == 0
    finally:
        await nc.close()

    lines = first.lines + second.lines
    printed = [int(line.split()[0]) for line in lines]
    twice = sorted(p for p, n in Counter(printed).items() if n > 1)
    assert not twice, f"positions printed more than once: {twice}"
    assert printed == sorted(stored), "every stored position, in order"
    assert int(state.read_text()) == max(stored)
    for line in lines:
        position, event_type, aggregate_id = line.split()
        _, aggregate, name, version = event_type.split(".")
        assert f"{aggregate}.{name}" == stored[int(position)]
        assert version.startswith("v")
        UUID(aggregate_id)
    kinds = {stored[p].split(".")[1] for p in printed}
    assert {"RequestSubmitted", "RerunRequested", "PatchProduced", "RunSucceeded"} <= kinds
    assert {"RunFailed", "CancelRequested", "RunCancelled"} <= kinds
    assert json.loads(original.data or b"{}")["position"] == max(stored)

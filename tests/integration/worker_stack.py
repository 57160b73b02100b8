"""Worker processes' services (forgeline.bootstrap.run_services) run in the test's event loop
with the settings a test needs, plus what the tests of scheduling and recovery ask of them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import psycopg
from nats.js import JetStreamContext
from psycopg_pool import AsyncConnectionPool

from broker import subjects
from broker.commands import publish_command
from broker.connection import connect
from domain.application import EVENTS_TABLE, Forgeline
from domain.commands import RequestSpec, SubmitRequest
from domain.run import Run
from forgeline.bootstrap import Servers, open_store, run_services
from forgeline.settings import Settings
from projections.views import Views
from tests.integration.conftest import eventually, in_thread


class Running(Protocol):
    """What the helpers below need of running services (Services here, test_executor's Stack)."""

    js: JetStreamContext
    app: Forgeline

    def check_alive(self) -> None: ...


@dataclass
class Services:
    js: JetStreamContext
    app: Forgeline
    views: Views
    tasks: list[asyncio.Task[None]]
    stops: list[asyncio.Event]

    def check_alive(self) -> None:
        for task in self.tasks:
            if task.done():
                raise RuntimeError(f"services stopped: {task.exception()!r}")


@asynccontextmanager
async def services(
    nats_url: str,
    database_url: str,
    data_dir: Path,
    *,
    workers: int = 1,
    with_worker: bool = True,
    **overrides: Any,
) -> AsyncIterator[Services]:
    """`workers` worker processes' services; the first also relays and projects (and is no
    worker when with_worker is false)."""
    nc = await connect(nats_url, name="worker-stack-tests")
    app = await in_thread(open_store, database_url)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database_url, min_size=1, open=False)
    await pool.open()
    tasks, stops = [], []
    provisioner = overrides.pop("provisioner", "local")
    for index in range(workers):
        settings = Settings(
            data_dir=data_dir,
            nats_url=nats_url,
            database_url=database_url,
            provisioner=provisioner,
            worker_name=f"itest-worker-{index}-{uuid.uuid4().hex[:6]}",
            **{"worker_slots": 1, "shutdown_grace_s": 5, **overrides},
        )
        roles = {"worker", "relay", "projector"} if index == 0 else {"worker"}
        if not with_worker:
            roles.discard("worker")
        stop = asyncio.Event()
        servers = Servers(nats_url=nats_url, database_url=database_url)
        tasks.append(
            asyncio.create_task(run_services(settings, servers, stop, roles=frozenset(roles)))
        )
        stops.append(stop)
    try:
        js = nc.jetstream()
        await eventually(lambda: js.stream_info(subjects.COMMANDS_STREAM), message="streams")
        yield Services(js, app, Views(pool), tasks, stops)
    finally:
        for stop in stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await pool.close()
        app.close()
        await nc.close()


async def submit(svc: Running, repo: Path | str, script: str, **spec: Any) -> SubmitRequest:
    svc.check_alive()
    command = SubmitRequest(
        command_id=f"cmd-{uuid.uuid4()}",
        request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        spec=RequestSpec(repo=str(repo), prompt=script, **spec),
    )
    await publish_command(svc.js, command)
    return command


async def run_now(svc: Running, run_id: UUID) -> Run:
    svc.check_alive()
    return await in_thread(svc.app.get_run, run_id)  # type: ignore[no-any-return]


async def finished(svc: Running, run_id: UUID, timeout: float = 30) -> Run:
    async def terminal() -> Run | None:
        run = await run_now(svc, run_id)
        return run if run.is_terminal else None

    run: Run = await eventually(terminal, timeout, f"run {run_id} to end")
    return run


def claim_order(database_url: str, run_ids: list[UUID]) -> list[UUID]:
    """The runs in the order their first ProvisioningStarted was recorded."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT originator_id, min(notification_id) FROM {EVENTS_TABLE}"
            " WHERE originator_id = ANY(%s) AND topic LIKE '%%ProvisioningStarted'"
            " GROUP BY originator_id ORDER BY 2",
            (run_ids,),
        ).fetchall()
    return [UUID(str(row[0])) for row in rows]


def queued_rows(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        exists = conn.execute("SELECT to_regclass('forgeline_run_queue') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.execute(
            "SELECT count(*) FROM forgeline_run_queue WHERE claimed_by IS NULL"
        ).fetchone()
    return int(row[0]) if row else 0


def event_types(database_url: str, run_id: UUID) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT topic FROM {EVENTS_TABLE} WHERE originator_id = %s"
            " ORDER BY originator_version",
            (run_id,),
        ).fetchall()
    return [str(row[0]).rsplit(".", 1)[-1] for row in rows]

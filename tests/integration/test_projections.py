"""Projections against real Postgres: the live tables, a rebuild from position 0 and racing
runners all end with the same rows, and those rows say what happened to each request."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from domain.application import Forgeline
from domain.commands import RequestSpec
from domain.request import Request
from domain.run import Run
from domain.status import FailureCode
from forgeline.bootstrap import open_store
from projections.runner import ProjectionRunner
from projections.schema import LIVE_PREFIX, POSITIONS_TABLE, tables
from projections.views import Views
from tests.integration.conftest import eventually, in_thread, store_positions

DIFF = "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"
STATS = {
    "sha256": "ab" * 32,
    "bytes": len(DIFF),
    "files_changed": 1,
    "insertions": 1,
    "deletions": 1,
}


@dataclass
class Story:
    """One request of the scenario: its id, its runs, and what a reader must see."""

    request_id: UUID
    run_ids: list[UUID]
    request_status: str
    run_statuses: list[str]
    error: str | None = None


class Scenario:
    """Writes requests through the domain, the way the handlers and the executor do."""

    def __init__(self, app: Forgeline) -> None:
        self.app = app
        self.stories: dict[str, Story] = {}

    def submit(self, prompt: str = "echo hi", **spec: Any) -> tuple[Request, Run]:
        request, run = Request.submit(
            request_id=uuid.uuid4(),
            run_id=uuid.uuid4(),
            spec=RequestSpec(repo="/srv/repo", prompt=prompt, **spec),
            command_id=f"cmd-{uuid.uuid4()}",
        )
        self.app.save(request, run)
        return request, run

    def change(self, run_id: UUID, *steps: str, **kw: Any) -> Run:
        """Applies named steps to the stored run and saves them in one transaction."""
        run = self.app.get_run(run_id)
        for step in steps:
            if step == "claim":
                run.start_provisioning(kw.get("worker", "worker-1"))
            elif step == "start":
                run.record_workspace("local", "c0ffee" * 6 + "ab")
                run.start()
            elif step == "patch":
                run.record_patch(DIFF, STATS)
            elif step == "succeed":
                run.succeed(0, 3, "f" * 64)
            elif step == "fail":
                run.fail(kw["code"], "it went wrong", exit_code=kw.get("exit_code"))
            elif step == "cancel":
                run.request_cancel("cancelled by client", f"cmd-{uuid.uuid4()}")
            elif step == "cancelled":
                run.cancel("cancelled by client")
            elif step == "requeue":
                run.requeue("worker_lost")
            else:
                raise AssertionError(step)
        self.app.save(run)
        return run

    def rerun(self, request_id: UUID, prompt: str | None = None) -> Run:
        request = self.app.get_request(request_id)
        latest = self.app.get_run(request.latest_run_id)
        run = request.rerun(
            run_id=uuid.uuid4(), prompt=prompt, command_id=f"cmd-{uuid.uuid4()}", latest=latest
        )
        self.app.save(request, run)
        return run

    def play(self, bulk: int = 30) -> None:
        add = self.stories.__setitem__
        _, run = self.submit(labels={"team": "a"}, priority=1)
        add("queued", Story(run.request_id, [run.id], "queued", ["queued"]))

        _, run = self.submit(ref="main", timeout_s=60)
        self.change(run.id, "claim", "start")
        self.change(run.id, "patch", "succeed")
        add("succeeded", Story(run.request_id, [run.id], "patch_ready", ["succeeded"]))

        _, run = self.submit()
        self.change(run.id, "claim")
        self.change(run.id, "start")
        self.change(run.id, "patch", "fail", code=FailureCode.AGENT_FAILED, exit_code=3)
        add(
            "agent_failed",
            Story(run.request_id, [run.id], "failed", ["failed"], error="agent_failed"),
        )

        _, run = self.submit()
        self.change(run.id, "claim")
        self.change(run.id, "fail", code=FailureCode.REPO_UNREACHABLE)
        add(
            "unreachable",
            Story(run.request_id, [run.id], "failed", ["failed"], error="repo_unreachable"),
        )

        _, run = self.submit()
        self.change(run.id, "cancel")  # queued: cancelled at once
        add("cancelled_queued", Story(run.request_id, [run.id], "cancelled", ["cancelled"]))

        _, run = self.submit()
        self.change(run.id, "claim", "start")
        self.change(run.id, "cancel")
        self.change(run.id, "cancelled")
        add("cancelled_running", Story(run.request_id, [run.id], "cancelled", ["cancelled"]))

        _, run = self.submit()
        self.change(run.id, "claim", "start")
        self.change(run.id, "requeue")  # its worker was lost
        self.change(run.id, "claim", "start", worker="worker-2")
        self.change(run.id, "patch", "succeed")
        add("requeued", Story(run.request_id, [run.id], "patch_ready", ["succeeded"]))

        _, first = self.submit()
        self.change(first.id, "claim", "start")
        self.change(first.id, "patch", "succeed")
        second = self.rerun(first.request_id, "echo follow-up")
        add(
            "rerun_queued",
            Story(first.request_id, [first.id, second.id], "queued", ["succeeded", "queued"]),
        )

        _, first = self.submit()
        self.change(first.id, "claim")
        self.change(first.id, "fail", code=FailureCode.WORKSPACE_FAILED)
        second = self.rerun(first.request_id)
        self.change(second.id, "claim", "start")
        self.change(second.id, "patch", "succeed")
        third = self.rerun(first.request_id, "echo third")
        self.change(third.id, "claim", "start")
        add(
            "rerun_running",
            Story(
                first.request_id,
                [first.id, second.id, third.id],
                "running",
                ["failed", "succeeded", "running"],
            ),
        )

        for i in range(bulk):
            _, run = self.submit(prompt=f"echo {i}")
            if i % 3 == 0:
                self.change(run.id, "claim", "start")
            if i % 3 == 1:
                self.change(run.id, "cancel")


def table_rows(database_url: str, prefix: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the prefix's read tables, ordered by id."""
    requests, runs = tables(prefix)
    with psycopg.connect(database_url) as conn:
        return {
            name: conn.execute(sql.SQL("SELECT * FROM {} ORDER BY id").format(table)).fetchall()
            for name, table in (("requests", requests), ("runs", runs))
        }


def applied_position(database_url: str, prefix: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            sql.SQL("SELECT position FROM {} WHERE name = %s").format(
                sql.Identifier(POSITIONS_TABLE)
            ),
            (f"{prefix}tables",),
        ).fetchone()
    return int(row[0]) if row else 0


def log_position_updates(database_url: str) -> None:
    """A trigger recording every committed move of a projection position (old, new)."""
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE position_log (seq bigserial, name text, old bigint, new bigint)")
        conn.execute(
            "CREATE FUNCTION log_position() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " INSERT INTO position_log (name, old, new) VALUES (NEW.name, OLD.position,"
            " NEW.position); RETURN NEW; END $$"
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER log_position AFTER UPDATE ON {} FOR EACH ROW"
                " EXECUTE FUNCTION log_position()"
            ).format(sql.Identifier(POSITIONS_TABLE))
        )


def position_updates(database_url: str, name: str) -> list[tuple[int, int]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT old, new FROM position_log WHERE name = %s ORDER BY seq", (name,)
        ).fetchall()
    return [(int(old), int(new)) for old, new in rows]


def rebuilt_rows(app: Forgeline, database_url: str, prefix: str) -> dict[str, list[Any]]:
    runner = ProjectionRunner(app, database_url, prefix=prefix, batch_size=13)
    try:
        applied = runner.rebuild()
    finally:
        runner.close()
    assert applied == len(store_positions(database_url))
    return table_rows(database_url, prefix)


@asynccontextmanager
async def running(*runners: ProjectionRunner) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(runner.run(stop)) for runner in runners]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def caught_up(database_url: str, prefix: str) -> None:
    async def done() -> bool:
        last = (await in_thread(store_positions, database_url))[-1]
        return await in_thread(applied_position, database_url, prefix) == last

    await eventually(done, timeout=20, message=f"{prefix} to apply every event")


async def test_rebuild_from_zero_gives_exactly_the_live_rows(
    store: Forgeline, database_url: str
) -> None:
    """The live projector follows the scenario as it happens; a rebuild replays it at once."""
    scenario = Scenario(store)
    live = ProjectionRunner(store, database_url, batch_size=7)
    async with running(live):
        await in_thread(scenario.play)
        await caught_up(database_url, LIVE_PREFIX)
    live.close()

    live_rows = await in_thread(table_rows, database_url, LIVE_PREFIX)
    assert len(live_rows["requests"]) == len(scenario.stories) + 30
    rebuilt = await in_thread(rebuilt_rows, store, database_url, "rebuild_")
    assert rebuilt == live_rows

    # And the rows tell each story as a reader of the API sees it.
    async with AsyncConnectionPool(database_url, min_size=1, open=False) as pool:
        views = Views(pool)
        for name, story in scenario.stories.items():
            view = await views.get_request(story.request_id)
            assert view is not None, name
            assert view["status"] == story.request_status, name
            assert [run["id"] for run in view["runs"]] == [str(r) for r in story.run_ids], name
            assert [run["status"] for run in view["runs"]] == story.run_statuses, name
            assert view["latest_run_id"] == str(story.run_ids[-1]), name
            latest = view["runs"][-1]
            assert (latest["error"] or {}).get("code") == story.error, name
        succeeded = await views.get_run(scenario.stories["succeeded"].run_ids[0])
        assert succeeded is not None and succeeded["patch"]["sha256"] == STATS["sha256"]
        assert await views.get_run_diff(scenario.stories["agent_failed"].run_ids[0]) == DIFF
        requeued = await views.get_run(scenario.stories["requeued"].run_ids[0])
        assert requeued is not None and requeued["attempt"] == 2
        queued, _ = await views.list_requests(status="queued", limit=500, cursor=None)
        assert {scenario.stories["rerun_queued"].request_id} <= {UUID(r["id"]) for r in queued}


async def test_two_runners_racing_on_one_prefix_apply_each_event_once(
    store: Forgeline, database_url: str
) -> None:
    """Two projector processes on the same tables while events are being written."""
    prefix = "race_"
    other = await in_thread(open_store, database_url)
    runners = [
        ProjectionRunner(store, database_url, prefix=prefix, batch_size=5),
        ProjectionRunner(other, database_url, prefix=prefix, batch_size=5),
    ]
    positions: list[int] = []
    watching = asyncio.Event()

    async def watch() -> None:
        while not watching.is_set():
            positions.append(await in_thread(applied_position, database_url, prefix))
            await asyncio.sleep(0.005)

    await in_thread(runners[0].create_tables)
    await in_thread(log_position_updates, database_url)
    watcher = asyncio.create_task(watch())
    try:
        async with running(*runners):
            await in_thread(Scenario(store).play, 60)
            await caught_up(database_url, prefix)
    finally:
        watching.set()
        await watcher
        for runner in runners:
            runner.close()
        other.close()

    assert positions == sorted(positions), "the position moved backwards"
    assert len(set(positions)) > 5  # the watcher saw the runners at work
    # The committed batches chain up: each starts where the previous one ended, none twice.
    steps = await in_thread(position_updates, database_url, f"{prefix}tables")
    assert steps[0][0] == 0
    assert all(new > old for old, new in steps)
    assert all(prev[1] == step[0] for prev, step in itertools.pairwise(steps))
    assert steps[-1][1] == (await in_thread(store_positions, database_url))[-1]
    single = await in_thread(rebuilt_rows, store, database_url, "single_")
    assert await in_thread(table_rows, database_url, prefix) == single


async def test_runner_restarted_resumes_from_its_position(
    store: Forgeline, database_url: str
) -> None:
    """A projector stopped and started again applies only what it had not applied."""
    scenario = Scenario(store)
    await in_thread(scenario.play, 0)
    first = ProjectionRunner(store, database_url, prefix="resume_", batch_size=10)
    await in_thread(first.create_tables)
    applied_before = await in_thread(first.catch_up)
    first.close()
    await in_thread(Scenario(store).play, 10)

    second = ProjectionRunner(store, database_url, prefix="resume_", batch_size=10)
    await in_thread(second.create_tables)  # as at every start: keeps rows and position
    applied_after = await in_thread(second.catch_up)
    second.close()

    total = len(await in_thread(store_positions, database_url))
    assert applied_before + applied_after == total
    resumed = await in_thread(table_rows, database_url, "resume_")
    assert resumed == await in_thread(rebuilt_rows, store, database_url, "single_")

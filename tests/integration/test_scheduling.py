"""Scheduling as a user sees it: with one slot and a backlog, a priority-1 request starts
before earlier priority-5 ones, projects take turns, `queue_position` counts down, and the
global limit holds across worker processes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import psycopg
import pytest

from broker.commands import publish_command
from domain.commands import CancelRequest
from domain.status import RunStatus
from handlers.scheduling import RunQueue
from tests.integration.conftest import eventually
from tests.integration.worker_stack import (
    Services,
    claim_order,
    finished,
    queued_rows,
    run_now,
    services,
    submit,
)


@pytest.fixture
async def one_slot(own_nats: str, database_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    async with services(own_nats, database_url, tmp_path, worker_slots=1) as svc:
        yield svc


async def block_the_slot(svc: Services, repo: Path, gate: Path) -> UUID:
    """A run that holds the only slot until gate exists."""
    blocker = await submit(svc, repo, f"while [ ! -e {gate} ]; do sleep 0.05; done\n")

    async def running() -> bool:
        return (await run_now(svc, blocker.run_id)).status is RunStatus.RUNNING

    await eventually(running, message="the blocker to run")
    return blocker.run_id


async def positions(svc: Services, run_ids: list[UUID]) -> list[int | None]:
    return [(await svc.views.get_run(run_id) or {}).get("queue_position") for run_id in run_ids]


async def test_priority_1_starts_before_earlier_priority_5_and_positions_count_down(
    one_slot: Services, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    blocker = await block_the_slot(one_slot, git_repo, gate)
    low = [(await submit(one_slot, git_repo, "true", priority=5)).run_id for _ in range(3)]
    urgent = (await submit(one_slot, git_repo, "true", priority=1)).run_id
    backlog = [*low, urgent]

    async def all_placed() -> list[int | None] | None:
        # Triggers are queued in order: once the last one has a place, the others have theirs
        # and one read of all four sees one queue (read while it grew, the first three could
        # show their places before the urgent one came in, and it its place after).
        if (await positions(one_slot, [urgent]))[0] is None:
            return None
        seen = await positions(one_slot, backlog)
        return seen if None not in seen else None

    assert await eventually(all_placed, message="queue positions") == [2, 3, 4, 1]
    last_seen = [4]

    async def count_down() -> bool:
        # The last priority-5 run moves up as the others start, never down.
        view = await one_slot.views.get_run(low[-1])
        assert view is not None
        if view["queue_position"] is not None:
            assert view["queue_position"] <= last_seen[-1], last_seen
            last_seen.append(view["queue_position"])
        return view["status"] != "queued"

    gate.touch()
    await eventually(count_down, timeout=30, message="the backlog to start", interval=0.01)
    for run_id in backlog:
        assert (await finished(one_slot, run_id)).status is RunStatus.SUCCEEDED
    assert claim_order(database_url, [blocker, *backlog]) == [blocker, urgent, *low]
    assert last_seen[-1] == 1, last_seen
    assert queued_rows(database_url) == 0


async def test_projects_take_turns_within_a_priority(
    one_slot: Services, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    blocker = await block_the_slot(one_slot, git_repo, gate)
    busy = [
        (await submit(one_slot, git_repo, "true", labels={"project": "busy"})).run_id
        for _ in range(3)
    ]
    quiet = [
        (await submit(one_slot, git_repo, "true", labels={"project": "quiet"})).run_id
        for _ in range(2)
    ]
    await eventually(lambda: queued_rows(database_url) == 5, message="the backlog queued")

    gate.touch()
    for run_id in [*busy, *quiet]:
        await finished(one_slot, run_id)
    order = claim_order(database_url, [blocker, *busy, *quiet])
    assert order == [blocker, busy[0], quiet[0], busy[1], quiet[1], busy[2]]


async def test_global_limit_holds_across_worker_processes(
    own_nats: str, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    live, marks = tmp_path / "live", tmp_path / "marks"
    live.mkdir()
    marks.mkdir()
    # Each run records how many runs were going when it started, across both workers (3
    # slots each, 2 at most in all).
    script = f"touch {live}/$$; ls {live} | wc -l > {marks}/$$; sleep 0.3; rm {live}/$$\n"
    async with services(
        own_nats, database_url, tmp_path / "data", workers=2, worker_slots=3, global_slots=2
    ) as svc:
        runs = [(await submit(svc, git_repo, script)).run_id for _ in range(8)]
        for run_id in runs:
            assert (await finished(svc, run_id)).status is RunStatus.SUCCEEDED
    seen = [int(path.read_text()) for path in marks.iterdir()]
    assert len(seen) == 8 and max(seen) <= 2, seen


async def test_a_cancelled_queued_run_leaves_the_queue_and_the_next_moves_up(
    one_slot: Services, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    await block_the_slot(one_slot, git_repo, gate)
    first, second = [await submit(one_slot, git_repo, "true") for _ in range(2)]

    async def placed() -> bool:
        return await positions(one_slot, [first.run_id, second.run_id]) == [1, 2]

    await eventually(placed, message="both runs placed")
    await publish_command(
        one_slot.js, CancelRequest(command_id=f"cmd-{uuid.uuid4()}", request_id=first.request_id)
    )

    async def moved_up() -> bool:
        return await positions(one_slot, [second.run_id]) == [1]

    await eventually(moved_up, message="the second run to move up")
    assert (await run_now(one_slot, first.run_id)).status is RunStatus.CANCELLED
    assert queued_rows(database_url) == 1
    gate.touch()
    assert (await finished(one_slot, second.run_id)).status is RunStatus.SUCCEEDED


async def test_a_slot_is_free_once_its_run_ended_while_the_queue_row_still_goes(
    one_slot: Services, database_url: str, git_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one slot, the next run starts and ends while the queue row of the run before is
    still being removed (held here by a gate in front of the real removal)."""
    gate = asyncio.Event()
    removing: list[UUID] = []
    remove = RunQueue.remove

    async def held_remove(queue: RunQueue, run_id: UUID) -> None:
        removing.append(run_id)
        await gate.wait()
        await remove(queue, run_id)

    monkeypatch.setattr(RunQueue, "remove", held_remove)
    try:
        first = await submit(one_slot, git_repo, "true\n")
        second = await submit(one_slot, git_repo, "true\n")
        assert (await finished(one_slot, first.run_id)).status is RunStatus.SUCCEEDED
        assert (await finished(one_slot, second.run_id)).status is RunStatus.SUCCEEDED
        assert removing[0] == first.run_id and _rows(database_url, [first.run_id]) == 1
    finally:
        gate.set()
    runs = [first.run_id, second.run_id]
    await eventually(lambda: _rows(database_url, runs) == 0, message="their rows removed")


def _rows(database_url: str, run_ids: list[UUID]) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM forgeline_run_queue WHERE run_id = ANY(%s)", (run_ids,)
        ).fetchone()
    return int(row[0]) if row else 0

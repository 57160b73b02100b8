"""Real `forgeline worker` processes: one killed with SIGKILL mid-run loses its lease and
another worker recovers the run (its agent stopped, its workspace removed, a new attempt);
one stopped with SIGTERM lets its agent finish within the grace period, and hands back an
agent that outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.run import Run
from domain.status import RunStatus
from tests.e2e.support import clean_env, forgeline_executable
from tests.integration.conftest import eventually, in_thread
from tests.integration.worker_stack import (
    Services,
    event_types,
    finished,
    run_now,
    services,
    submit,
)

LEASE_S = 3.0


@pytest.fixture
def spawn(own_nats: str, database_url: str, tmp_path: Path) -> Iterator[Any]:
    """Starts `forgeline worker` processes on this test's servers; kills leftovers."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def start(name: str, **settings: str) -> subprocess.Popen[bytes]:
        env = clean_env(
            nats_url=own_nats,
            database_url=database_url,
            data_dir=str(tmp_path / "data"),
            provisioner="local",
            worker_name=name,
            **{"worker_slots": "2", "run_ack_wait_s": str(LEASE_S), **settings},
        )
        log = (tmp_path / f"{name}.log").open("wb")
        logs.append(log)
        proc = subprocess.Popen(
            [forgeline_executable(), "worker"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    for log in logs:
        log.close()


async def running_on(svc: Services, run_id: Any, worker: str) -> Run:
    async def there() -> Run | None:
        run = await run_now(svc, run_id)
        return run if run.status is RunStatus.RUNNING and run.worker == worker else None

    run: Run = await eventually(there, timeout=30, message=f"the run to run on {worker}")
    return run


def beats(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


async def test_a_run_of_a_killed_worker_is_recovered_by_another(
    spawn: Any, own_nats: str, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    marker, beat = tmp_path / "first-attempt", tmp_path / "beat"
    # The first attempt runs until killed (touching beat); the second one ends at once.
    script = (
        f"if [ -e {marker} ]; then echo second > done.txt; exit 0; fi\n"
        f"touch {marker}\nwhile true; do touch {beat}; sleep 0.05; done\n"
    )
    async with services(
        own_nats, database_url, tmp_path / "data", with_worker=False, run_ack_wait_s=LEASE_S
    ) as svc:
        victim = spawn("victim")
        command = await submit(svc, git_repo, script)
        await running_on(svc, command.run_id, "victim")
        await eventually(beat.exists, message="the agent to beat")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()

        spawn("rescuer")
        run = await finished(svc, command.run_id, timeout=30)
        took = time.monotonic() - killed_at

        assert run.status is RunStatus.SUCCEEDED, run.error
        assert (run.attempt, run.lost_count, run.worker) == (2, 1, "rescuer")
        assert run.patch is not None and "second" in run.patch
        assert took < LEASE_S + 15, f"recovered {took:.1f} s after the kill"
        # The lost agent was stopped: its heartbeat file no longer changes.
        last = beats(beat)
        time.sleep(0.3)
        assert beats(beat) == last, "the lost agent still runs"
        assert event_types(database_url, command.run_id) == [
            "RunQueued",
            "ProvisioningStarted",
            "WorkspaceProvisioned",
            "RunStarted",
            "RunRequeued",
            "ProvisioningStarted",
            "WorkspaceProvisioned",
            "RunStarted",
            "PatchProduced",
            "RunSucceeded",
        ]
        requeued = [
            e
            for e in await in_thread(svc.app.repository.event_store.get, command.run_id)
            if type(e).__name__ == "RunRequeued"
        ]
        assert [e.cause for e in requeued] == ["worker_lost"]
        view = await svc.views.get_run(command.run_id)
        assert view is not None and view["attempt"] == 2


def stop_cleanly(worker: subprocess.Popen[bytes]) -> float:
    """SIGTERM; the seconds until the worker exited with 0."""
    worker.send_signal(signal.SIGTERM)
    began = time.monotonic()
    assert worker.wait(30) == 0
    return time.monotonic() - began


async def handed_back_cleanly(svc: Services, run_id: Any) -> None:
    run = await run_now(svc, run_id)
    assert run.status is RunStatus.QUEUED
    assert run.lost_count == 0, "a clean stop must not count as a lost worker"


async def test_sigterm_lets_a_short_run_finish_and_hands_a_long_one_back(
    spawn: Any, own_nats: str, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    short = f"while [ ! -e {go} ]; do sleep 0.05; done\nsleep 1\necho short > short.txt\n"
    long = "sleep 600\n"
    async with services(
        own_nats, database_url, tmp_path / "data", with_worker=False, run_ack_wait_s=LEASE_S
    ) as svc:
        worker = spawn("stopping", shutdown_grace_s="4")
        finishing = await submit(svc, git_repo, short)
        stuck = await submit(svc, git_repo, long)
        await running_on(svc, finishing.run_id, "stopping")
        await running_on(svc, stuck.run_id, "stopping")

        go.touch()
        took = stop_cleanly(worker)

        done = await run_now(svc, finishing.run_id)
        assert done.status is RunStatus.SUCCEEDED, done.error
        assert done.attempt == 1 and done.patch is not None
        await handed_back_cleanly(svc, stuck.run_id)
        assert 3.5 < took < 15, f"stopped after {took:.1f} s (grace 4 s)"
        assert event_types(database_url, stuck.run_id)[-1] == "RunRequeued"
        assert event_types(database_url, finishing.run_id).count("RunSucceeded") == 1


def _siblings(pid: int) -> set[int]:
    """The extra worker processes pid started (its other children are agents)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                if b"forgeline" in argv and b"worker" in argv:
                    found.add(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_sigterm_with_every_slot_busy_stops_within_the_grace(
    spawn: Any, own_nats: str, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    # The agent never ends by itself: the slot it holds is never freed.
    async with services(
        own_nats, database_url, tmp_path / "data", with_worker=False, run_ack_wait_s=LEASE_S
    ) as svc:
        worker = spawn("full", worker_slots="1", shutdown_grace_s="2")
        stuck = await submit(svc, git_repo, "sleep 600\n")
        await running_on(svc, stuck.run_id, "full")

        took = stop_cleanly(worker)

        assert took < 15, f"stopped after {took:.1f} s (grace 2 s)"
        await handed_back_cleanly(svc, stuck.run_id)


async def running_on_any(svc: Services, run_id: Any) -> Run:
    async def running() -> Run | None:
        run = await run_now(svc, run_id)
        return run if run.status is RunStatus.RUNNING else None

    run: Run = await eventually(running, timeout=30, message="the run to run")
    return run


async def test_worker_processes_share_the_slots_and_a_dead_one_is_started_again(
    spawn: Any, own_nats: str, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done\necho done > done.txt\n"
    async with services(
        own_nats, database_url, tmp_path / "data", with_worker=False, run_ack_wait_s=LEASE_S
    ) as svc:
        main = spawn("pair", worker_processes="2")
        first = await submit(svc, git_repo, script)
        second = await submit(svc, git_repo, script)
        # One slot in each process: the two runs run at once, one in each.
        held = {(await running_on_any(svc, r.run_id)).worker for r in (first, second)}
        assert held == {"pair", "pair-2"}
        (sibling,) = _siblings(main.pid)

        # The sibling dies: it is started again, and its run is recovered after the lease.
        lost = first if (await run_now(svc, first.run_id)).worker == "pair-2" else second
        os.kill(sibling, signal.SIGKILL)
        await eventually(
            lambda: len(_siblings(main.pid) - {sibling}) == 1,
            timeout=15,
            message="the worker process to be started again",
        )
        gate.touch()
        for command in (first, second):
            run = await finished(svc, command.run_id, timeout=LEASE_S + 30)
            assert run.status is RunStatus.SUCCEEDED, run.error
        assert (await run_now(svc, lost.run_id)).lost_count == 1

        # SIGTERM stops the process and its sibling with it.
        (restarted,) = _siblings(main.pid)
        main.send_signal(signal.SIGTERM)
        assert main.wait(30) == 0
        await eventually(lambda: not _alive(restarted), timeout=15, message="the sibling to stop")
    # Both write to one stderr: the sibling's lines say which process wrote them.
    lines = (tmp_path / "pair.log").read_text().splitlines()
    assert any(" [pair-2] " in line for line in lines), lines


async def test_an_extra_worker_process_stops_when_its_parent_dies(
    spawn: Any, own_nats: str, database_url: str, tmp_path: Path
) -> None:
    main = spawn("orphan", worker_processes="2")
    await eventually(lambda: len(_siblings(main.pid)) == 1, timeout=30, message="the sibling")
    (sibling,) = _siblings(main.pid)
    main.send_signal(signal.SIGKILL)
    main.wait(10)
    await eventually(lambda: not _alive(sibling), timeout=30, message="the orphan to stop")

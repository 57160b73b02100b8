"""More worker processes on one machine (FORGELINE_WORKER_PROCESSES).

A worker's executor takes every step of its runs on one event loop, and one loop keeps one core
busy at most: on a machine with more cores, runs wait for the loop while cores idle
(docs/benchmarks.md, "Drain"). With FORGELINE_WORKER_PROCESSES=N, a process that runs the
worker role starts N-1 more processes that run the worker role alone (`forgeline worker`)
against the same servers, and the slots (FORGELINE_WORKER_SLOTS, the runs this machine runs at
once) are shared among the N. Each extra process has a name of its own (its leases and the
recovery of its runs tell it apart) and a data folder of its own (a worker removes whatever it
finds in its workspaces folder when it starts: siblings must not share one).

One that exits while this process runs is started again after a pause (its runs are recovered
like any lost worker's); when this process stops, they get SIGTERM (their agents have the
shutdown grace) and are killed after it; if this process dies, they notice within a second
and stop (PARENT_PID_ENV).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from forgeline.settings import Settings

log = logging.getLogger(__name__)

# Set in an extra worker process's environment: the pid of the process that started it.
PARENT_PID_ENV = "FORGELINE_PARENT_PID"
_RESTART_PAUSE_S = 1.0  # the first pause before an exited process is started again
_RESTART_PAUSE_MAX_S = 30.0  # pauses double while it keeps exiting, up to this
_STEADY_S = 60.0  # a process that ran this long exited for a new reason: pause from the start
_PARENT_CHECK_S = 1.0
_KILL_MARGIN_S = 10.0  # after the shutdown grace, before SIGKILL


def slot_shares(slots: int, processes: int) -> list[int]:
    """slots spread over processes as evenly as they go; the first ones get the remainder."""
    base, rest = divmod(slots, processes)
    return [base + (1 if index < rest else 0) for index in range(processes)]


def own_slots(settings: Settings) -> int:
    """The slots of the worker in this process (the first share)."""
    return slot_shares(settings.worker_slots, settings.worker_processes)[0]


@dataclass(frozen=True)
class ExtraWorker:
    """One extra worker process: what it is called, its slots, its data folder."""

    name: str
    slots: int
    data_dir: Path

    def environment(
        self, base: Mapping[str, str], nats_url: str, database_url: str
    ) -> dict[str, str]:
        return {
            **base,
            "FORGELINE_NATS_URL": nats_url,
            "FORGELINE_DATABASE_URL": database_url,
            "FORGELINE_WORKER_NAME": self.name,
            "FORGELINE_WORKER_SLOTS": str(self.slots),
            "FORGELINE_WORKER_PROCESSES": "1",
            "FORGELINE_DATA_DIR": str(self.data_dir),
            # Ports are this process's: an extra worker serves no /metrics of its own and
            # gives its LLM proxy a free port.
            "FORGELINE_METRICS_PORT": "",
            "FORGELINE_LLM_PROXY_PORT": "0",
            PARENT_PID_ENV: str(os.getpid()),
        }


def extra_workers(settings: Settings) -> list[ExtraWorker]:
    shares = slot_shares(settings.worker_slots, settings.worker_processes)
    return [
        ExtraWorker(
            name=f"{settings.worker_name}-{number}",
            slots=slots,
            data_dir=settings.data_dir / "workers" / str(number),
        )
        for number, slots in enumerate(shares[1:], start=2)
    ]


class ExtraWorkerProcesses:
    """Keeps the extra worker processes running until stop is set, then stops them."""

    def __init__(self, settings: Settings, nats_url: str, database_url: str) -> None:
        self._workers = extra_workers(settings)
        self._grace_s = settings.shutdown_grace_s
        self._nats_url, self._database_url = nats_url, database_url

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._keep_running(worker, stop) for worker in self._workers))

    async def _keep_running(self, worker: ExtraWorker, stop: asyncio.Event) -> None:
        pause = _RESTART_PAUSE_S
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            worker.data_dir.mkdir(parents=True, exist_ok=True)
            began = loop.time()
            code = await self._run_once(worker, stop)
            if code is None:
                return  # stopped by us
            if loop.time() - began > _STEADY_S:
                pause = _RESTART_PAUSE_S
            log.error(
                "worker process %s exited with code %s; starting it again in %.0f s",
                worker.name,
                code,
                pause,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            pause = min(pause * 2, _RESTART_PAUSE_MAX_S)

    async def _run_once(self, worker: ExtraWorker, stop: asyncio.Event) -> int | None:
        """Runs the process until it exits (its code) or until stop (None, once it is gone)."""
        env = worker.environment(os.environ, self._nats_url, self._database_url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forgeline", "worker", env=env
        )
        exited = asyncio.ensure_future(proc.wait())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                return exited.result()
        finally:
            stopping.cancel()
            if not exited.done():  # stop, or this task cancelled: the process goes too
                await asyncio.shield(self._stop(proc, exited))
        return None

    async def _stop(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(exited), self._grace_s + _KILL_MARGIN_S)
        except TimeoutError:
            log.warning("worker process %s did not stop in time: killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await exited


async def stop_when_parent_exits(parent_pid: int, stop: asyncio.Event) -> None:
    """Sets stop once this process's parent is no longer parent_pid (it died: init adopted
    this one), so that an extra worker does not outlive the process that started it."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("the process that started this worker (%d) is gone: stopping", parent_pid)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _PARENT_CHECK_S)

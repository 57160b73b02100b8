"""Case 8: time to recover a run after its worker was killed (kill -9 mid-run).

Forgeline: the gateway, relay and projector in one process, two worker processes of one slot
each, local workspaces, the default lease (FORGELINE_RUN_ACK_WAIT_S). Each trial submits one
request whose agent sleeps on its first attempt and finishes at once on any later one (a marker
file outside the workspace tells the attempts apart); once it runs, the worker holding it is
killed with SIGKILL. The clock runs from the kill until GET /v1/runs/{id} shows the run
(a) running again, attempt 2 or later, on the other worker, and (b) succeeded. The killed worker
is started again (same name and data dir, as a supervisor would) before the next trial.

Floor: the lease itself. A dead worker is known only by the heartbeats it no longer sends, so
no recovery can start before the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from bench.common import (
    AUTH,
    Child,
    Config,
    Forgeline,
    Row,
    Stack,
    bench_env,
    latency_summary,
    make_repo,
    stack,
)
from forgeline.settings import Settings

CASE = "8 recovery"
FIRST_ATTEMPT_S = 120  # the first attempt would run this long if its worker lived
POLL_S = 0.02


def _script(marker: Path) -> str:
    return (
        f"if [ -e {marker} ]; then echo recovered >> README.md; exit 0; fi\n"
        f"touch {marker}\necho 'first attempt'\nsleep {FIRST_ATTEMPT_S}\n"
    )


def default_lease_s() -> float:
    """The lease every bench process gets (bench_env drops FORGELINE_* of this environment)."""
    return float(Settings.model_fields["run_ack_wait_s"].default)


class Worker:
    """A `bench.serve --roles worker` process that keeps its name and data dir across kills."""

    def __init__(self, st: Stack, name: str, nats_url: str, database_url: str) -> None:
        self.name = f"bench-{name}"
        self.data_dir = st.dir(f"data-recovery-{name}")
        self._st = st
        self._env = bench_env(
            FORGELINE_NATS_URL=nats_url,
            FORGELINE_DATABASE_URL=database_url,
            FORGELINE_DATA_DIR=str(self.data_dir),
            FORGELINE_PROVISIONER="local",
            FORGELINE_WORKER_SLOTS="1",
            FORGELINE_WORKER_NAME=self.name,
        )
        self.child: Child | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "bench.serve", "--roles", "worker"]
        self.child = Child(self.name, argv, self._env, self._st.dir("logs"))
        self.child.wait_ready(timeout=120)

    def kill(self) -> None:
        """SIGKILL of the worker's process group (its agent runs in a session of its own)."""
        assert self.child is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child.pid, signal.SIGKILL)
        self.child.proc.wait(timeout=10)
        self.child.stop()  # closes its pipes and log

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@dataclass
class Trial:
    to_running_s: float
    to_succeeded_s: float
    attempt: int


def _holder(database_url: str, run_id: str) -> str | None:
    """The worker named by the run's latest ProvisioningStarted (None before the first)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT state FROM forgeline_events WHERE originator_id = %s"
            " AND topic LIKE %s ORDER BY originator_version DESC LIMIT 1",
            (run_id, "%ProvisioningStarted"),
        ).fetchone()
    return str(json.loads(bytes(row[0]))["worker"]) if row else None


def _wait(api: httpx.Client, run_id: str, done: str, timeout: float) -> dict[str, object]:
    """Polls GET /v1/runs/{id} until done(view) holds; returns the view."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = api.get(f"/v1/runs/{run_id}")
        if response.status_code == 200:
            view = response.json()
            status, attempt = view["status"], int(view.get("attempt") or 0)
            if done == "running-1" and status == "running" and attempt == 1:
                return dict(view)
            if done == "running-again" and status in ("running", "succeeded") and attempt >= 2:
                return dict(view)
            if done == "ended" and status in ("succeeded", "failed", "cancelled"):
                return dict(view)
        time.sleep(POLL_S)
    raise TimeoutError(f"run {run_id} not {done} within {timeout} s")


def one_trial(
    api: httpx.Client, repo: Path, workers: dict[str, Worker], database_url: str, lease_s: float
) -> Trial:
    marker = repo.parent / f"recovery-{uuid.uuid4().hex}"
    response = api.post("/v1/requests", json={"repo": str(repo), "prompt": _script(marker)})
    response.raise_for_status()
    run_id = response.json()["run_id"]
    _wait(api, run_id, "running-1", timeout=60)
    holder = _holder(database_url, run_id)
    assert holder in workers, f"run {run_id} held by {holder!r}, not by a bench worker"
    victim = workers[holder]
    victim.kill()
    killed = time.monotonic()
    again = _wait(api, run_id, "running-again", timeout=lease_s * 4 + 60)
    to_running = time.monotonic() - killed
    ended = _wait(api, run_id, "ended", timeout=60)
    to_succeeded = time.monotonic() - killed
    if ended["status"] != "succeeded":
        raise RuntimeError(f"run {run_id} ended {ended['status']}: {ended.get('error')}")
    victim.start()  # as a supervisor would, before the next trial
    return Trial(to_running, to_succeeded, int(str(again.get("attempt") or 0)))


def measure(st: Stack, cfg: Config, repo: Path) -> list[Trial]:
    nats_url, database_url = st.nats("recovery"), st.database("recovery")
    lease_s = default_lease_s()
    front = Forgeline(
        st,
        nats_url=nats_url,
        database_url=database_url,
        roles=("gateway", "relay", "projector"),
        name="recovery-front",
    )
    workers = {w.name: w for w in (Worker(st, n, nats_url, database_url) for n in ("a", "b"))}
    try:
        for worker in workers.values():
            worker.start()
        trials = 1 if cfg.quick else max(5, cfg.trials)
        with httpx.Client(base_url=front.url, headers=AUTH, timeout=30) as api:
            return [one_trial(api, repo, workers, database_url, lease_s) for _ in range(trials)]
    finally:
        for worker in workers.values():
            worker.stop()
        front.stop()


def rows(trials: list[Trial], lease_s: float) -> list[Row]:
    floor = {"p50": lease_s * 1000, "p99": lease_s * 1000, "n": 1}
    extra = {"trials": [t.__dict__ for t in trials], "lease_s": lease_s}
    return [
        Row(
            case=CASE,
            metric="kill -9 of a worker mid-run -> the run running again on another worker",
            kind="latency",
            unit="ms",
            value=latency_summary([t.to_running_s for t in trials]),
            floor_name=f"the lease ({lease_s:g} s)",
            floor=floor,
            note=f"{len(trials)} trials, local workspaces",
            extra=extra,
        ),
        Row(
            case=CASE,
            metric="kill -9 of a worker mid-run -> the run succeeded on another worker",
            kind="latency",
            unit="ms",
            value=latency_summary([t.to_succeeded_s for t in trials]),
            floor_name=f"the lease ({lease_s:g} s)",
            floor=floor,
            note="the second attempt is a no-op agent",
            extra=extra,
        ),
    ]


async def run(cfg: Config, st: Stack | None = None, repo: Path | None = None) -> list[Row]:
    """The case's rows; on the given stack and repo, or on its own."""

    def blocking() -> list[Row]:
        lease_s = default_lease_s()
        if st is not None and repo is not None:
            return rows(measure(st, cfg, repo), lease_s)
        with stack() as own:
            return rows(measure(own, cfg, make_repo(own.dir("repo") / "repo")), lease_s)

    return await asyncio.to_thread(blocking)


if __name__ == "__main__":  # python -m bench.recovery [--quick]: this case alone
    config = Config.make(quick="--quick" in sys.argv, rounds=None, trials=None)
    for row in asyncio.run(run(config)):
        print(json.dumps(row.as_json(), default=str))

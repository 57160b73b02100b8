"""Case 5: drain N queued no-op requests with S slots, runs/s.

Forgeline: one process with every role (as `forgeline up`), local workspaces,
FORGELINE_WORKER_SLOTS = S. The N requests are POSTed as fast as 8 concurrent clients can;
the clock runs from the first POST until the read model shows all N runs terminal (one kept
connection, polled every 100 ms), so it includes ingest and projection, as a user sees it.

Floor: the same N clone/run/diff by hand (bench.e2e_latency.by_hand) on S threads. Trials
alternate (Forgeline, by hand, Forgeline, ...) so that a change in the machine's background
load hits both. CPU seconds per run are read from /proc for each process tree involved
(Forgeline with its git children, Postgres, nats-server; the by-hand threads' children).
The same drain through Celery, alternating with Forgeline's, is case 6 (bench/alternative.py).
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.common import (
    AUTH,
    Config,
    Forgeline,
    Row,
    Stack,
    rate_summary,
    submit_body,
    tree_cpu_seconds,
)
from bench.e2e_latency import by_hand

CASE = "5 drain"
POLL_S = 0.1

Meters = dict[str, Callable[[], float]]


async def _submit_all(url: str, body: dict[str, Any], n: int, headers: dict[str, str]) -> int:
    """POSTs n requests from 8 clients; returns how many were accepted."""
    accepted = 0
    todo = iter(range(n))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:

        async def one_client() -> None:
            nonlocal accepted
            for _ in todo:
                response = await client.post("/v1/requests", json=body)
                if response.status_code in (200, 201, 202):
                    accepted += 1

        await asyncio.gather(*(one_client() for _ in range(8)))
    return accepted


class Counter:
    """(finished, failed) rows of a status table, through one kept connection."""

    def __init__(self, database_url: str, query: str) -> None:
        self._url, self._query = database_url, query
        self._conn: psycopg.Connection[Any] | None = None

    def __call__(self) -> tuple[int, int]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True)
        row = self._conn.execute(self._query).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def forgeline_counter(database_url: str) -> Counter:
    return Counter(
        database_url,
        "SELECT count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled')),"
        " count(*) FILTER (WHERE status IN ('failed', 'cancelled')) FROM forgeline_view_runs",
    )


def cpu_per_run(meters: Meters, before: dict[str, float], runs: int) -> dict[str, float]:
    """Milliseconds of CPU per run, by process tree."""
    return {name: 1000 * (read() - before[name]) / max(1, runs) for name, read in meters.items()}


def submit_and_drain(
    url: str,
    body: dict[str, Any],
    n: int,
    finished: Callable[[], tuple[int, int]],
    headers: dict[str, str],
    timeout: float,
    meters: Meters | None = None,
) -> dict[str, Any]:
    """POSTs n requests, waits until finished() says n more are done."""
    meters = meters or {}
    done0, failed0 = finished()
    cpu0 = {name: read() for name, read in meters.items()}
    start = time.perf_counter()
    accepted = asyncio.run(_submit_all(url, body, n, headers))
    submitted = time.perf_counter() - start
    deadline = start + timeout
    while True:
        done, failed = finished()
        if done - done0 >= accepted:
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {done - done0} of {accepted} runs ended in {timeout} s")
        time.sleep(POLL_S)
    elapsed = time.perf_counter() - start
    return {
        "runs_per_s": accepted / elapsed,
        "elapsed_s": elapsed,
        "submit_s": submitted,
        "accepted": accepted,
        "failed": failed - failed0,
        "cpu_ms_per_run": cpu_per_run(meters, cpu0, accepted),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def by_hand_parallel(repo: Path, workdir: Path, n: int, slots: int) -> dict[str, Any]:
    cpu0, start = _children_cpu(), time.perf_counter()
    with ThreadPoolExecutor(slots) as pool:
        list(pool.map(lambda i: by_hand(repo, workdir, 100_000 + i), range(n)))
    elapsed = time.perf_counter() - start
    return {
        "runs_per_s": n / elapsed,
        "cpu_ms_per_run": {"git and bash": 1000 * (_children_cpu() - cpu0) / n},
    }


class ForgelineDrain:
    """A Forgeline with every role (or the stack's shared one), ready to drain N requests."""

    def __init__(self, st: Stack, cfg: Config, repo: Path, name: str = "drain") -> None:
        self._cfg, self._repo = cfg, repo
        shared = st.local_forgeline(cfg.slots)
        self._own = shared is None
        if shared is not None:
            self.fl, database_url = shared
        else:
            nats_url, database_url = st.nats(name), st.database(name)
            self.fl = Forgeline(
                st, nats_url=nats_url, database_url=database_url, slots=cfg.slots, name=name
            )
        self._counter = forgeline_counter(database_url)
        self._meters: Meters = {
            "forgeline process": lambda: tree_cpu_seconds(self.fl.pid),
            "postgres": lambda: tree_cpu_seconds(st.postgres_pid()),
            "nats-server": lambda: tree_cpu_seconds(st.nats_pid(self.fl.nats_url)),
        }

    def trial(self) -> dict[str, Any]:
        return submit_and_drain(
            self.fl.url,
            submit_body(self._repo),
            self._cfg.drain_n,
            self._counter,
            AUTH,
            timeout=max(120.0, self._cfg.drain_n * 2.0),
            meters=self._meters,
        )

    def close(self) -> None:
        self._counter.close()
        if self._own:
            self.fl.stop()


def cpu_note(trials: list[dict[str, Any]]) -> str:
    """'CPU/run: a 12 ms, b 3 ms' from the median trial's figures."""
    if not trials or not trials[0].get("cpu_ms_per_run"):
        return ""
    names = list(trials[0]["cpu_ms_per_run"])
    parts = []
    for name in names:
        values = sorted(t["cpu_ms_per_run"][name] for t in trials)
        parts.append(f"{name} {values[len(values) // 2]:.0f}")
    return "CPU ms/run: " + ", ".join(parts)


def run(st: Stack, cfg: Config, repo: Path) -> list[Row]:
    drain = ForgelineDrain(st, cfg, repo)
    workdir = st.dir("drain-by-hand")
    trials: list[dict[str, Any]] = []
    floor: list[dict[str, Any]] = []
    try:
        for _ in range(cfg.trials):
            trials.append(drain.trial())
            floor.append(by_hand_parallel(repo, workdir, cfg.drain_n, cfg.slots))
    finally:
        drain.close()
    failed = sum(t["failed"] for t in trials)
    notes = [f"{failed} failed" if failed else "", cpu_note(trials), "floor " + cpu_note(floor)]
    return [
        Row(
            case=CASE,
            metric=f"drain {cfg.drain_n} no-op requests, {cfg.slots} slots, local",
            kind="rate",
            unit="runs/s",
            value=rate_summary([t["runs_per_s"] for t in trials]),
            floor_name=f"by hand, {cfg.slots} threads",
            floor=rate_summary([f["runs_per_s"] for f in floor]),
            note="; ".join(n for n in notes if n),
            extra={"trials": trials, "floor_trials": floor},
        )
    ]

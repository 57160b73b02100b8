"""Case 5: drain N queued no-op requests with S slots, runs/s.

Forgeline: one process with every role (as `forgeline up`), local workspaces,
FORGELINE_WORKER_SLOTS = S. The N requests are POSTed as fast as 8 concurrent clients can;
the clock runs from the first POST until the read model shows all N runs terminal (polled
every 50 ms), so it includes ingest and projection, as a user would see it.

Floor: the same N clone/run/diff by hand (bench.e2e_latency.by_hand) on S threads.
The same drain through Celery is case 6 (bench/alternative.py), with `submit_and_drain`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.common import AUTH, Config, Forgeline, Row, Stack, rate_summary, submit_body
from bench.e2e_latency import by_hand

CASE = "5 drain"


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


def submit_and_drain(
    url: str,
    body: dict[str, Any],
    n: int,
    finished: Callable[[], tuple[int, int]],
    headers: dict[str, str],
    timeout: float,
) -> dict[str, float]:
    """POSTs n requests, waits until finished() says n are done; (done, failed) counts."""
    done0, failed0 = finished()
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
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    return {
        "runs_per_s": accepted / elapsed,
        "elapsed_s": elapsed,
        "submit_s": submitted,
        "accepted": accepted,
        "failed": failed - failed0,
    }


def forgeline_finished(database_url: str) -> Callable[[], tuple[int, int]]:
    def finished() -> tuple[int, int]:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status IN ('succeeded','failed','cancelled')),"
                " count(*) FILTER (WHERE status <> 'succeeded' AND status IN"
                " ('failed','cancelled')) FROM forgeline_view_runs"
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    return finished


def by_hand_parallel(repo: Path, workdir: Path, n: int, slots: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(slots) as pool:
        list(pool.map(lambda i: by_hand(repo, workdir, 100_000 + i), range(n)))
    return n / (time.perf_counter() - start)


def measure_forgeline(st: Stack, cfg: Config, repo: Path) -> list[dict[str, float]]:
    shared = st.local_forgeline(cfg.slots)
    if shared is not None:
        fl, database_url = shared
    else:
        nats_url, database_url = st.nats("drain"), st.database("drain")
        fl = Forgeline(
            st, nats_url=nats_url, database_url=database_url, slots=cfg.slots, name="drain"
        )
    try:
        return [
            submit_and_drain(
                fl.url,
                submit_body(repo),
                cfg.drain_n,
                forgeline_finished(database_url),
                AUTH,
                timeout=max(120.0, cfg.drain_n * 2.0),
            )
            for _ in range(cfg.trials)
        ]
    finally:
        if shared is None:
            fl.stop()


def run(st: Stack, cfg: Config, repo: Path) -> tuple[list[Row], list[dict[str, float]]]:
    trials = measure_forgeline(st, cfg, repo)
    workdir = st.dir("drain-by-hand")
    floor = [by_hand_parallel(repo, workdir, cfg.drain_n, cfg.slots) for _ in range(cfg.trials)]
    failed = sum(t["failed"] for t in trials)
    row = Row(
        case=CASE,
        metric=f"drain {cfg.drain_n} no-op requests, {cfg.slots} slots, local",
        kind="rate",
        unit="runs/s",
        value=rate_summary([t["runs_per_s"] for t in trials]),
        floor_name=f"by hand, {cfg.slots} threads",
        floor=rate_summary(floor),
        note=f"{failed} failed" if failed else "",
        extra={"trials": trials},
    )
    return [row], trials

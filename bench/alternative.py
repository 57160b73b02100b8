"""Case 6: the stack users would pick instead, Celery + Redis + Postgres, side by side.

Started here, on this machine, in this run: redis-server (Debian's package) on a free port
with no persistence (`--save '' --appendonly no`), a database of the bench's embedded
Postgres, the HTTP endpoint (bench/celery_web.py, uvicorn) and a Celery worker
(bench/celery_app.py, prefork pool, concurrency = the same slots as Forgeline's worker).

Measured as Forgeline is in cases 1, 4 and 5, with the same load generator and clients:
ingest latency at the same fixed rate and max throughput (with no worker running, as
Forgeline's gateway-only ingest has no consumer), end-to-end latency of one no-op request at a
time (POST, then GET every 5 ms until patch_ready), and the drain of N requests with CPU
seconds per run by process tree. Forgeline's ingest and end-to-end numbers are those of cases
1 and 4 of the same run (measured here when those cases were not selected); its drain is
measured here again, each trial right after a Celery trial, so that both see the same
background load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from bench import drain, e2e_latency, ingest
from bench.common import (
    Child,
    Config,
    Row,
    Stack,
    bench_env,
    latency_summary,
    rate_summary,
    submit_body,
    tree_cpu_seconds,
)
from bench.loadgen import LoadResult
from forgeline.embedded import free_port

CASE = "6 vs Celery"
FLOOR_NAME = "Celery + Redis + Postgres"


class Unavailable(RuntimeError):
    """Redis or Celery is missing: the case is skipped with this reason."""


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("bench: installing Debian's redis-server (apt-get)", file=sys.stderr)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
            check=False,
            capture_output=True,
        )
        found = shutil.which("redis-server")
        if found:
            return found
    raise Unavailable("redis-server not found (apt-get install redis-server)")


class Alternative:
    """Redis, the Celery endpoint and (once start_worker is called) the Celery worker."""

    def __init__(self, st: Stack, slots: int) -> None:
        try:
            import celery  # noqa: F401
        except ImportError as exc:
            raise Unavailable("celery is not installed (pip install -e '.[bench]')") from exc
        self._st = st
        self.slots = slots
        port = free_port()
        redis_dir = st.dir("redis")
        self.redis = Child(
            "redis",
            [
                redis_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(redis_dir),
                "--logfile",
                str(redis_dir / "redis.log"),
            ],
            bench_env(),
            st.dir("logs"),
            ready_line=False,
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self._wait_redis()
        self.database_url = st.database("alternative")
        self.env = bench_env(
            BENCH_REDIS_URL=self.redis_url,
            BENCH_ALT_DATABASE_URL=self.database_url,
            BENCH_ALT_WORKDIR=str(st.dir("alternative-work")),
        )
        self.web = Child(
            "celery-web", [sys.executable, "-m", "bench.celery_web"], self.env, st.dir("logs")
        )
        self.url = f"http://127.0.0.1:{self.web.wait_ready(60)}"
        self.worker: Child | None = None
        self.finished = drain.Counter(
            self.database_url,
            "SELECT count(*) FILTER (WHERE status IN ('patch_ready', 'failed')),"
            " count(*) FILTER (WHERE status = 'failed') FROM alt_requests",
        )

    def _wait_redis(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError as exc:
                    if time.monotonic() > deadline or self.redis.proc.poll() is not None:
                        raise RuntimeError(
                            f"redis-server did not start:\n{self.redis.tail()}"
                        ) from exc
                    time.sleep(0.05)
        finally:
            client.close()

    def reset(self) -> None:
        """Forgets every queued task and row (after the ingest measurement)."""
        client = redis.Redis.from_url(self.redis_url)
        client.flushdb()
        client.close()
        with psycopg.connect(self.database_url) as conn:
            conn.execute("DELETE FROM alt_requests")

    def start_worker(self) -> None:
        self.worker = Child(
            "celery-worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(self.slots),
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--hostname",
                "bench@%h",
            ],
            self.env,
            self._st.dir("logs"),
            ready_line=False,
        )

    def meters(self) -> drain.Meters:
        worker = self.worker
        assert worker is not None
        return {
            "celery worker": lambda: tree_cpu_seconds(worker.pid),
            "http endpoint": lambda: tree_cpu_seconds(self.web.pid),
            "postgres": lambda: tree_cpu_seconds(self._st.postgres_pid()),
            "redis": lambda: tree_cpu_seconds(self.redis.pid),
        }

    def stop(self) -> None:
        self.finished.close()
        for child in (self.worker, self.web, self.redis):
            if child is not None:
                with contextlib.suppress(Exception):
                    child.stop()


async def _one(client: httpx.AsyncClient, repo: Path) -> float:
    seconds, _, _ = await e2e_latency.post_until_patch_ready(client, repo)
    return seconds


async def _e2e(url: str, repo: Path, rounds: int, warmup: int, timeout: float) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        # The first request also waits for the worker to come up.
        await asyncio.wait_for(_one(client, repo), timeout)
        return [await _one(client, repo) for _ in range(rounds + warmup)][warmup:]


def measure(
    st: Stack, cfg: Config, repo: Path, forgeline: drain.ForgelineDrain | None
) -> dict[str, Any]:
    """Celery's numbers; with forgeline, Forgeline's drain trials alternate with Celery's."""
    alt = Alternative(st, cfg.slots)
    body = submit_body(repo)
    mine: list[dict[str, Any]] = []
    try:
        rate: list[LoadResult] = []
        peak: list[LoadResult] = []
        for _ in range(cfg.trials):
            rate.append(ingest.fixed_rate(alt.url + "/v1/requests", body, cfg, auth=False))
            peak.append(ingest.closed_loop(alt.url + "/v1/requests", body, cfg, auth=False))
        alt.reset()
        alt.start_worker()
        e2e = asyncio.run(_e2e(alt.url, repo, cfg.rounds, cfg.warmup, timeout=120))
        drains = []
        for _ in range(cfg.trials):
            drains.append(
                drain.submit_and_drain(
                    alt.url,
                    body,
                    cfg.drain_n,
                    alt.finished,
                    {},
                    timeout=max(120.0, cfg.drain_n * 2.0),
                    meters=alt.meters(),
                )
            )
            if forgeline is not None:
                mine.append(forgeline.trial())
    finally:
        alt.stop()
    return {"rate": rate, "peak": peak, "e2e": e2e, "drain": drains, "forgeline_drain": mine}


def run(st: Stack, cfg: Config, repo: Path, mine: dict[str, Row]) -> list[Row]:
    """mine: Forgeline's rows of the same run, by key: ingest_rate, ingest_max, e2e. Its
    drain is measured here again, its trials alternating with Celery's."""
    forgeline = drain.ForgelineDrain(st, cfg, repo, name="drain-vs-celery")
    try:
        theirs = measure(st, cfg, repo, forgeline)
    finally:
        forgeline.close()
    if "ingest_rate" not in mine or "ingest_max" not in mine:
        rows = ingest.run(st, cfg, repo)
        mine = {**mine, "ingest_rate": rows[0], "ingest_max": rows[1]}
    if "e2e" not in mine:
        mine = {
            **mine,
            "e2e": e2e_latency.rows(
                "local", e2e_latency.measure(st, "local", cfg.rounds, cfg.warmup, cfg.slots)
            )[0],
        }

    def failures(results: list[LoadResult]) -> str:
        text = "; ".join(f for r in results if (f := r.failures()))
        return f"Celery failures: {text}" if text else ""

    failed = sum(d["failed"] for d in theirs["drain"])
    return [
        Row(
            case=CASE,
            metric=f"ingest POST -> 202 at {cfg.ingest_rate:g}/s",
            kind="latency",
            unit="ms",
            value=mine["ingest_rate"].value,
            floor_name=FLOOR_NAME,
            floor=latency_summary([x for r in theirs["rate"] for x in r.latencies]),
            note=failures(theirs["rate"]),
        ),
        Row(
            case=CASE,
            metric=f"ingest max throughput, {cfg.ingest_concurrency} in flight",
            kind="rate",
            unit="req/s",
            value=mine["ingest_max"].value,
            floor_name=FLOOR_NAME,
            floor=rate_summary([r.throughput for r in theirs["peak"]]),
            note=failures(theirs["peak"]),
        ),
        Row(
            case=CASE,
            metric="end-to-end no-op, one at a time, local",
            kind="latency",
            unit="ms",
            value=mine["e2e"].value,
            floor_name=FLOOR_NAME,
            floor=latency_summary(theirs["e2e"]),
        ),
        Row(
            case=CASE,
            metric=f"drain {cfg.drain_n} no-op requests, {cfg.slots} slots",
            kind="rate",
            unit="runs/s",
            value=rate_summary([d["runs_per_s"] for d in theirs["forgeline_drain"]]),
            floor_name=FLOOR_NAME,
            floor=rate_summary([d["runs_per_s"] for d in theirs["drain"]]),
            note="; ".join(
                n
                for n in (
                    f"Celery: {failed} failed" if failed else "",
                    "Forgeline " + drain.cpu_note(theirs["forgeline_drain"]),
                    "Celery " + drain.cpu_note(theirs["drain"]),
                )
                if n
            ),
            extra={
                "celery_trials": theirs["drain"],
                "forgeline_trials": theirs["forgeline_drain"],
            },
        ),
    ]

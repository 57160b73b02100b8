"""Case 3: projection lag under a steady load, and rebuild speed against a raw SELECT.

Lag. One Forgeline process with the gateway, worker and projector roles (no relay: runs are
not executed, so the machine's two cores go to the command path and the projection, not to
git). The load generator POSTs requests at `lag_rate` per second for `lag_seconds`; a watcher
polls every 2 ms the store's last position and the projector's saved position. An event's lag
is the time from the first poll that sees it in the store to the first poll that sees the
projector's position reach it (+-2 ms).

Floor of the lag: applying a batch of the same size to the read tables (rows and position in
one transaction, ProjectionRunner.process_batch), timed in this process on a copy of the
tables, with no polling wait: the lag a projector would have if it were told of each commit.

Rebuild. `forgeline projections rebuild` (projections.rebuild.rebuild_and_swap: fold in
memory, COPY, swap) over the whole store, events/s, against the floor of any rebuild: one raw
SELECT of the same rows (notification_id, originator_id, originator_version, topic, state)
through psycopg, nothing decoded. For the evidence, in the notes: eventsourcing's
select_notifications plus decoding every event (nothing written), and ProjectionRunner's
per-event SQL path (the live projector's) into fresh tables.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    AUTH,
    Config,
    Forgeline,
    Row,
    Stack,
    bench_env,
    latency_summary,
    rate_summary,
    submit_body,
)
from bench.loadgen import LoadResult, LoadSpec, run_in_child
from bench.watch import PollingWatcher
from domain.application import Forgeline as ForgelineApp
from forgeline.bootstrap import open_store
from projections.runner import ProjectionRunner
from projections.schema import LIVE_PREFIX, POSITIONS_TABLE, drop_statements

CASE = "3 projection"
POLL_S = 0.002


class LagWatcher(PollingWatcher):
    """Samples (time, store's last position, projector's position) every POLL_S."""

    QUERY = (
        "SELECT (SELECT coalesce(max(notification_id), 0) FROM forgeline_events),"
        f" (SELECT coalesce(max(position), 0) FROM {POSITIONS_TABLE} WHERE name = %s)"
    )

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url, POLL_S)
        self.samples: list[tuple[float, int, int]] = []

    async def sample(self, conn: psycopg.AsyncConnection[Any], at: float) -> None:
        cur = await conn.execute(self.QUERY, (f"{LIVE_PREFIX}tables",))
        row = await cur.fetchone()
        assert row is not None
        self.samples.append((at, int(row[0]), int(row[1])))

    async def caught_up(self, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.samples and self.samples[-1][1] == self.samples[-1][2]:
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"the projector did not catch up within {timeout} s")

    def append_rate(self, after: int) -> float:
        """Events/s the store took while it grew past `after`."""
        grown = [(t, stored) for t, stored, _ in self.samples if stored > after]
        if len(grown) < 2:
            return 0.0
        first = next(t for t, stored, _ in self.samples if stored > after)
        last_t = min(t for t, stored in grown if stored == grown[-1][1])
        return (grown[-1][1] - after) / (last_t - first) if last_t > first else 0.0

    def lags(self, after: int) -> tuple[list[float], float]:
        """Per position past `after`: (lags in s, mean positions per projector step)."""
        times = [s[0] for s in self.samples]
        stored = [s[1] for s in self.samples]
        projected = [s[2] for s in self.samples]
        last = stored[-1]
        lags = []
        for position in range(after + 1, last + 1):
            i = bisect.bisect_left(stored, position)
            j = bisect.bisect_left(projected, position)
            if i < len(times) and j < len(times):
                lags.append(max(0.0, times[j] - times[i]))
        steps = sum(1 for a, b in itertools.pairwise(projected) if b > a > after)
        return lags, (last - after) / max(1, steps)


async def _steady_load(
    fl: Forgeline, database_url: str, body: dict[str, Any], cfg: Config
) -> tuple[list[float], float, LoadResult, float]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT coalesce(max(notification_id), 0) FROM forgeline_events")
        before = int(row.fetchone()[0])  # type: ignore[index]
    spec = LoadSpec(
        url=fl.url + "/v1/requests",
        body=body,
        headers=AUTH,
        mode="rate",
        rate=cfg.lag_rate,
        count=int(cfg.lag_rate * cfg.lag_seconds),
        max_seconds=cfg.lag_seconds,
        concurrency=256,
    )
    async with LagWatcher(database_url) as watcher:
        load = await asyncio.to_thread(run_in_child, spec, bench_env())
        await asyncio.sleep(0.5)  # the last commands reach the store
        await watcher.caught_up(120)
    lags, batch = watcher.lags(before)
    return lags, batch, load, watcher.append_rate(before)


def _apply_floor(app: ForgelineApp, database_url: str, batch: int, samples: int) -> list[float]:
    """Times process_batch() of `batch` events into fresh tables, `samples` times."""
    prefix = "bench_floor_"
    with psycopg.connect(database_url, autocommit=True) as conn:
        for statement in drop_statements(prefix):
            conn.execute(statement)
        conn.execute(f"DELETE FROM {POSITIONS_TABLE} WHERE name = %s", (f"{prefix}tables",))
    runner = ProjectionRunner(app, database_url, prefix=prefix, batch_size=batch)
    try:
        runner.create_tables()
        times = []
        for _ in range(samples):
            at = time.perf_counter()
            if not runner.process_batch():
                break
            times.append(time.perf_counter() - at)
        return times
    finally:
        runner.close()


def rebuild_rates(
    app: ForgelineApp, database_url: str, *, per_event: bool = True
) -> dict[str, float]:
    """events/s of: a raw SELECT, read+decode, the bulk rebuild (and the per-event path)."""
    with psycopg.connect(database_url) as conn:
        count = int(conn.execute("SELECT count(*) FROM forgeline_events").fetchone()[0])  # type: ignore[index]
        at = time.perf_counter()
        with conn.cursor(name="bench_raw") as cur:
            cur.itersize = 5000
            cur.execute(
                "SELECT notification_id, originator_id, originator_version, topic, state"
                " FROM forgeline_events ORDER BY notification_id"
            )
            for _ in cur:
                pass
        raw = count / (time.perf_counter() - at)
    at = time.perf_counter()
    start, decoded = 0, 0
    while True:
        notes = app.recorder.select_notifications(start=start, limit=500, inclusive_of_start=False)
        if not notes:
            break
        for note in notes:
            app.mapper.to_domain_event(note)
        decoded += len(notes)
        start = notes[-1].id
    decode = decoded / (time.perf_counter() - at)
    per_event_rate = float("nan")
    if per_event:
        runner = ProjectionRunner(app, database_url, prefix="bench_rebuild_")
        try:
            at = time.perf_counter()
            applied = runner.rebuild()
            per_event_rate = applied / (time.perf_counter() - at)
        finally:
            runner.close()
    try:
        from projections.rebuild import rebuild_and_swap
    except ImportError:  # before bulk rebuilds existed
        rebuild = per_event_rate
    else:
        at = time.perf_counter()
        rebuild_and_swap(app, database_url)
        rebuild = count / (time.perf_counter() - at)
    return {
        "raw": raw,
        "decode": decode,
        "rebuild": rebuild,
        "per_event": per_event_rate,
        "events": count,
    }


def run(st: Stack, cfg: Config, repo: Path) -> list[Row]:
    nats_url, database_url = st.nats("projection"), st.database("projection")
    fl = Forgeline(
        st,
        nats_url=nats_url,
        database_url=database_url,
        roles=("gateway", "worker", "projector"),
        name="projection",
        worker_processes=st.worker_processes or 1,  # the case's one process (docs/benchmarks.md)
    )
    lags: list[float] = []
    batches: list[float] = []
    loads: list[LoadResult] = []
    appended: list[float] = []
    try:
        for _ in range(cfg.trials):
            lag, batch, load, rate = asyncio.run(
                _steady_load(fl, database_url, submit_body(repo), cfg)
            )
            lags += lag
            batches.append(batch)
            loads.append(load)
            appended.append(rate)
    finally:
        with contextlib.suppress(Exception):
            fl.stop()
    app = open_store(database_url)
    try:
        mean_batch = max(1, round(sum(batches) / len(batches)))
        floor_apply = _apply_floor(app, database_url, mean_batch, 200)
        rebuilds = [rebuild_rates(app, database_url) for _ in range(cfg.trials)]
    finally:
        app.close()
    failures = "; ".join(f for r in loads if (f := r.failures()))
    events = rebuilds[-1]["events"]
    return [
        Row(
            case=CASE,
            metric=f"projection lag at {cfg.lag_rate:g} requests/s",
            kind="latency",
            unit="ms",
            value=latency_summary(lags),
            floor_name=f"apply one batch of {mean_batch} events, no wait",
            floor=latency_summary(floor_apply),
            note=(
                f"store took {rate_summary(appended)['p50']:.0f} events/s; +-{POLL_S * 1000:g} ms"
                + (f"; failures: {failures}" if failures else "")
            ),
            extra={
                "mean_events_per_projector_step": sum(batches) / len(batches),
                "store_append_events_per_s": appended,
            },
        ),
        Row(
            case=CASE,
            metric=f"  (same run) POST -> 202 at {cfg.lag_rate:g}/s, all but relay in 1 process",
            kind="latency",
            unit="ms",
            value=latency_summary([x for r in loads for x in r.latencies]),
            floor_name="see case 1's floor",
            floor=None,
        ),
        Row(
            case=CASE,
            metric=f"rebuild from 0 ({events} events)",
            kind="rate",
            unit="events/s",
            value=rate_summary([r["rebuild"] for r in rebuilds]),
            floor_name="raw SELECT of the same rows",
            floor=rate_summary([r["raw"] for r in rebuilds]),
            note="read+decode only: {:.0f}/s; per-event SQL (the live projector's path):"
            " {:.0f}/s".format(
                rate_summary([r["decode"] for r in rebuilds])["p50"],
                rate_summary([r["per_event"] for r in rebuilds])["p50"],
            ),
            extra={
                "decode_events_per_s": [r["decode"] for r in rebuilds],
                "per_event_sql_events_per_s": [r["per_event"] for r in rebuilds],
            },
        ),
    ]

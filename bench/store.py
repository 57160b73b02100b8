"""Case 2: command -> committed events, against eventsourcing saving the same aggregates.

Forgeline: the worker role alone in its own process (command handler; its executor idles, as
no relay publishes events). This process publishes SubmitRequest commands to JetStream (as
the gateway does) and a watcher polls the events table every 2 ms for new rows, noting when
each run id first shows (so latencies carry up to 2 ms of polling on top).

- latency: commands published at a fixed rate, publish -> the request's events visible;
- throughput: a backlog of commands published at once; events appended per second from the
  first new event to the last.

Floor, in a fresh database of the same Postgres: the same `Forgeline` application saving the
same aggregates (Request.submit) directly from this process: `save(request, run)` one command
at a time at the same fixed rate (latency), and `save(*aggs)` with `store_batch` requests per
call (throughput). The library alone, as it ships: without Forgeline's integrity triggers
(hash chains, forgeline/store_integrity.py), which cost, and with the library's own recorder,
not Forgeline's (forgeline/store_recorder.py: the same inserts sent in binary), which gains.
Both are measured apart (the same saves into a store with the triggers; into Forgeline's
store as it runs, triggers and recorder) and shown in the notes, so that the gap splits into
what the store as Forgeline configures it costs and what the command path costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any
from uuid import UUID

import nats
import psycopg
from eventsourcing.persistence import InfrastructureFactory
from nats.js import JetStreamContext

from bench.common import Config, Forgeline, Row, Stack, latency_summary, rate_summary
from bench.watch import PollingWatcher
from broker import subjects
from broker.commands import publish_command
from domain.application import Forgeline as App
from domain.commands import RequestSpec, SubmitRequest
from domain.request import Request
from forgeline.bootstrap import open_store
from forgeline.settings import eventsourcing_env
from forgeline.store_integrity import ensure_store_integrity

CASE = "2 commit"
POLL_S = 0.002
EVENTS_PER_SUBMIT = 2  # RequestSubmitted + RunQueued


class StoreWatcher(PollingWatcher):
    """Polls forgeline_events; remembers when each originator id was first visible."""

    def __init__(self, database_url: str, poll_s: float = POLL_S) -> None:
        super().__init__(database_url, poll_s)
        self.seen: dict[UUID, float] = {}
        self._last = 0

    async def sample(self, conn: psycopg.AsyncConnection[Any], at: float) -> None:
        cur = await conn.execute(
            "SELECT notification_id, originator_id FROM forgeline_events"
            " WHERE notification_id > %s ORDER BY notification_id",
            (self._last,),
        )
        rows = await cur.fetchall()
        for _, originator in rows:
            self.seen.setdefault(originator, at)
        if rows:
            self._last = rows[-1][0]

    async def wait_for(self, ids: list[UUID], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not all(i in self.seen for i in ids):
            if time.perf_counter() > deadline:
                missing = sum(i not in self.seen for i in ids)
                raise TimeoutError(f"{missing} of {len(ids)} commands not committed in {timeout} s")
            await asyncio.sleep(0.01)


def command(spec: RequestSpec) -> SubmitRequest:
    request_id, run_id = uuid.uuid4(), uuid.uuid4()
    return SubmitRequest(
        command_id=f"submit:{request_id}", request_id=request_id, run_id=run_id, spec=spec
    )


async def _forgeline(
    nats_url: str, database_url: str, spec: RequestSpec, cfg: Config
) -> tuple[list[float], list[float]]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        async with StoreWatcher(database_url) as watcher:
            warm = [command(spec) for _ in range(5)]
            for cmd in warm:
                await publish_command(js, cmd)
            await watcher.wait_for([c.run_id for c in warm], 60)
            latencies = await _at_rate(js, watcher, spec, cfg)
            rates = [await _backlog(js, watcher, spec, cfg) for _ in range(cfg.trials)]
    finally:
        await nc.drain()
    return latencies, rates


async def _at_rate(
    js: JetStreamContext, watcher: StoreWatcher, spec: RequestSpec, cfg: Config
) -> list[float]:
    sent: dict[UUID, float] = {}
    start = time.perf_counter()
    for i in range(cfg.store_latency_count):
        delay = start + i / cfg.store_rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        cmd = command(spec)
        sent[cmd.run_id] = time.perf_counter()
        await publish_command(js, cmd)
    await watcher.wait_for(list(sent), 60)
    return [watcher.seen[run_id] - at for run_id, at in sent.items()]


async def _backlog(
    js: JetStreamContext, watcher: StoreWatcher, spec: RequestSpec, cfg: Config
) -> float:
    commands = [command(spec) for _ in range(cfg.store_backlog)]
    payloads = [(c, c.model_dump_json().encode()) for c in commands]
    subject = subjects.command_subject("submit")
    for i in range(0, len(payloads), 500):
        acks = [
            await js.publish_async(
                subject,
                payload,
                stream=subjects.COMMANDS_STREAM,
                headers={"Nats-Msg-Id": c.command_id},
            )
            for c, payload in payloads[i : i + 500]
        ]
        await asyncio.gather(*acks)
    ids = [c.run_id for c in commands]
    await watcher.wait_for(ids, 600)
    times = [watcher.seen[i] for i in ids]
    span = max(times) - min(times)
    # The commands first seen committed open the clock: count only those committed after.
    after_first = sum(t > min(times) for t in times)
    return EVENTS_PER_SUBMIT * after_first / span if span > 0 else float("nan")


def _library_store(database_url: str) -> App:
    """The store with eventsourcing's own recorder (open_store chooses Forgeline's)."""
    env = eventsourcing_env(database_url)
    del env[InfrastructureFactory.APPLICATION_RECORDER_TOPIC]
    return App(env=env)


def _floor(
    database_url: str,
    spec: RequestSpec,
    cfg: Config,
    *,
    triggers: bool = False,
    forgeline_store: bool = False,
    latency: bool = True,
) -> dict[str, Any]:
    """forgeline_store: the store as Forgeline opens it (its recorder, its triggers)."""
    app = open_store(database_url) if forgeline_store else _library_store(database_url)
    if triggers or forgeline_store:
        ensure_store_integrity(database_url)

    def aggregates() -> tuple[Any, Any]:
        cmd = command(spec)
        return Request.submit(
            request_id=cmd.request_id, run_id=cmd.run_id, spec=spec, command_id=cmd.command_id
        )

    try:
        for _ in range(5):
            app.save(*aggregates())
        latencies = []
        start = time.perf_counter()
        for i in range(cfg.store_latency_count if latency else 0):
            delay = start + i / cfg.store_rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            request, run = aggregates()
            at = time.perf_counter()
            app.save(request, run)
            latencies.append(time.perf_counter() - at)
        batched = []
        for _ in range(cfg.trials):
            pairs = [aggregates() for _ in range(cfg.store_backlog)]
            at = time.perf_counter()
            for i in range(0, len(pairs), cfg.store_batch):
                app.save(*[agg for pair in pairs[i : i + cfg.store_batch] for agg in pair])
            batched.append(EVENTS_PER_SUBMIT * len(pairs) / (time.perf_counter() - at))
        single = [aggregates() for _ in range(min(cfg.store_backlog, 1000))]
        at = time.perf_counter()
        for request, run in single:
            app.save(request, run)
        one_each = EVENTS_PER_SUBMIT * len(single) / (time.perf_counter() - at)
    finally:
        app.close()
    return {"latencies": latencies, "batched": batched, "one_each": one_each}


def run(st: Stack, cfg: Config, repo: Any) -> list[Row]:
    spec = RequestSpec(repo=str(repo), prompt="echo benchmark >> README.md\n")
    nats_url, database_url = st.nats("store"), st.database("store")
    # One process, as its floor saves in one (--worker-processes changes it; docs/benchmarks.md).
    worker = Forgeline(
        st,
        nats_url=nats_url,
        database_url=database_url,
        roles=("worker",),
        name="store-worker",
        worker_processes=st.worker_processes or 1,
    )
    try:
        latencies, rates = asyncio.run(_forgeline(nats_url, database_url, spec, cfg))
    finally:
        with contextlib.suppress(Exception):
            worker.stop()
    floor = _floor(st.database("store_floor"), spec, cfg)
    # The same saves into a store with Forgeline's integrity triggers (hash chains): what the
    # design adds to the library's floor before any command handling.
    with_triggers = _floor(st.database("store_floor_triggers"), spec, cfg, triggers=True)
    # What Forgeline writes to: its recorder and its triggers (batched saves only).
    as_forgeline = _floor(
        st.database("store_floor_forgeline"), spec, cfg, forgeline_store=True, latency=False
    )
    return [
        Row(
            case=CASE,
            metric=f"publish -> events committed, at {cfg.store_rate:g}/s",
            kind="latency",
            unit="ms",
            value=latency_summary(latencies),
            floor_name="eventsourcing save(request, run) directly",
            floor=latency_summary(floor["latencies"]),
            note=f"includes <= {POLL_S * 1000:g} ms of store polling; floor with integrity"
            f" triggers: {latency_summary(with_triggers['latencies'])['p50']:.1f} ms",
            extra={"floor_with_triggers_ms": latency_summary(with_triggers["latencies"])},
        ),
        Row(
            case=CASE,
            metric=f"events appended/s, backlog of {cfg.store_backlog} commands",
            kind="rate",
            unit="events/s",
            value=rate_summary(rates),
            floor_name=f"eventsourcing save(*aggs), {cfg.store_batch} requests a call",
            floor=rate_summary(floor["batched"]),
            note=f"floor one command a save: {floor['one_each']:.0f}/s; with integrity"
            f" triggers: batched {rate_summary(with_triggers['batched'])['p50']:.0f}/s,"
            f" one a save {with_triggers['one_each']:.0f}/s; Forgeline's store (its"
            f" recorder + triggers): batched {rate_summary(as_forgeline['batched'])['p50']:.0f}/s",
            extra={
                "floor_one_save_per_command_events_per_s": floor["one_each"],
                "floor_with_triggers_batched": rate_summary(with_triggers["batched"]),
                "floor_with_triggers_one_save_per_command": with_triggers["one_each"],
                "floor_forgeline_store_batched": rate_summary(as_forgeline["batched"]),
            },
        ),
    ]

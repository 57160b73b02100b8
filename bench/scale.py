"""Case 7: reads with many requests in the store, against the same reads on a small store.

Requests are written straight into the store with batched `app.save(*aggs)` (50 requests a
call: a save of more than a few hundred KB can hang in psycopg's pipeline mode, see
docs/benchmarks.md), with a realistic mix of outcomes: 90% patch_ready (7 events each:
submitted, queued, provisioning, workspace, started, patch, succeeded), 8% failed (5 events),
2% still queued (2 events). The projector (ProjectionRunner.catch_up, in this process) then
brings the read tables up to date. A gateway (its own process) serves the reads.

Measured at `scale_small` requests (the floor: the same reads on a small store), then again
once the store holds `scale_big`, each `scale_samples` times, one at a time:
GET /v1/requests (first page of 50), filtered by a common status (patch_ready) and by a rare
one (queued, 2%), GET /v1/requests/{id}, GET /v1/requests/{id}/events (from the store), and
loading one Run aggregate (6 events) with app.repository.get in this process.
Also reported: the batched insert rate and the projector's catch-up rate at each size.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg

from bench.common import AUTH, NOOP_SCRIPT, Config, Forgeline, Row, Stack, latency_summary
from bench.projection import rebuild_rates
from domain.application import Forgeline as ForgelineApp
from domain.commands import RequestSpec
from domain.request import Request
from domain.status import FailureCode
from forgeline.bootstrap import open_store
from forgeline.store_integrity import ensure_store_integrity
from projections.runner import ProjectionRunner

CASE = "7 scale"
BATCH = 50
DIFF = "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1 +1,2 @@\n"
DIFF += " # bench\n+benchmark\n"
PATCH_STATS = {
    "sha256": "0" * 64,
    "bytes": len(DIFF),
    "files_changed": 1,
    "insertions": 1,
    "deletions": 0,
}


def _aggregates(spec: RequestSpec, index: int) -> tuple[list[Any], UUID, UUID]:
    request_id, run_id = uuid.uuid4(), uuid.uuid4()
    request, run = Request.submit(
        request_id=request_id, run_id=run_id, spec=spec, command_id=f"submit:{request_id}"
    )
    kind = index % 50
    if kind != 0:  # 2% stay queued
        run.start_provisioning("bench")
        run.record_workspace("local", "0" * 40)
        run.start()
        if kind <= 4:  # 8% fail
            run.fail(FailureCode.AGENT_FAILED, "exit code 1", exit_code=1)
        else:
            run.record_patch(DIFF, PATCH_STATS)
            run.succeed(0)
    return [request, run], request_id, run_id


class Store:
    def __init__(self, database_url: str, repo: Path) -> None:
        self.url = database_url
        self.app: ForgelineApp = open_store(database_url)
        # As every Forgeline process does at start-up: the hash-chain and append-only
        # triggers, before the first event (then the gateway's start changes nothing).
        ensure_store_integrity(database_url)
        self.runner = ProjectionRunner(self.app, database_url)
        self.runner.create_tables()
        self.spec = RequestSpec(repo=str(repo), prompt=NOOP_SCRIPT)
        self.count = 0
        self.sample: list[tuple[UUID, UUID]] = []  # (request id, run id) of succeeded ones

    def grow_to(self, total: int) -> dict[str, float]:
        """Inserts until the store holds total requests; then the projector catches up."""
        events = self._events()
        at = time.perf_counter()
        while self.count < total:
            aggs: list[Any] = []
            for _ in range(min(BATCH, total - self.count)):
                made, request_id, run_id = _aggregates(self.spec, self.count)
                if self.count % 50 > 4 and random.random() < 0.05:
                    self.sample.append((request_id, run_id))
                aggs += made
                self.count += 1
            self.app.save(*aggs)
        insert_s = time.perf_counter() - at
        inserted = self._events() - events
        at = time.perf_counter()
        applied = self.runner.catch_up()
        catch_up_s = time.perf_counter() - at
        return {
            "insert_events_per_s": inserted / insert_s,
            "catch_up_events_per_s": applied / catch_up_s if catch_up_s else 0.0,
            "events_inserted": inserted,
            "events_total": self._events(),
            "insert_s": insert_s,
            "catch_up_s": catch_up_s,
        }

    def _events(self) -> int:
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT coalesce(max(notification_id), 0) FROM forgeline_events")
            return int(row.fetchone()[0])  # type: ignore[index]

    def close(self) -> None:
        self.runner.close()
        self.app.close()


def _timed(samples: int, call: Any) -> list[float]:
    out = []
    for _ in range(samples):
        at = time.perf_counter()
        call()
        out.append(time.perf_counter() - at)
    return out


def _reads(url: str, store: Store, samples: int) -> dict[str, list[float]]:
    rng = random.Random(7)
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:

        def get(path: str) -> None:
            response = client.get(path)
            response.raise_for_status()

        def some_request() -> str:
            return str(rng.choice(store.sample)[0])

        for _ in range(5):  # warm-up: connections, caches
            get("/v1/requests?limit=50")
        return {
            "GET /v1/requests (first page of 50)": _timed(
                samples, lambda: get("/v1/requests?limit=50")
            ),
            "GET /v1/requests?status=patch_ready (90%)": _timed(
                samples, lambda: get("/v1/requests?status=patch_ready&limit=50")
            ),
            "GET /v1/requests?status=queued (2%)": _timed(
                samples, lambda: get("/v1/requests?status=queued&limit=50")
            ),
            "GET /v1/requests/{id}": _timed(samples, lambda: get(f"/v1/requests/{some_request()}")),
            "GET /v1/requests/{id}/events": _timed(
                samples, lambda: get(f"/v1/requests/{some_request()}/events")
            ),
            "load one Run aggregate (6 events)": _timed(
                samples, lambda: store.app.repository.get(rng.choice(store.sample)[1])
            ),
        }


def run(st: Stack, cfg: Config, repo: Path) -> list[Row]:
    nats_url, database_url = st.nats("scale"), st.database("scale")
    store = Store(database_url, repo)
    gateway: Forgeline | None = None
    try:
        small_growth = store.grow_to(cfg.scale_small)
        gateway = Forgeline(
            st,
            nats_url=nats_url,
            database_url=database_url,
            roles=("gateway",),
            name="scale-gateway",
        )
        small = _reads(gateway.url, store, cfg.scale_samples)
        big_growth = store.grow_to(cfg.scale_big)
        big = _reads(gateway.url, store, cfg.scale_samples)
        rebuild = rebuild_rates(store.app, database_url, per_event=False)
    finally:
        if gateway is not None:
            gateway.stop()
        store.close()
    rows = [
        Row(
            case=CASE,
            metric=f"{name}, {cfg.scale_big:,} requests",
            kind="latency",
            unit="ms",
            value=latency_summary(big[name]),
            floor_name=f"same, {cfg.scale_small:,} requests",
            floor=latency_summary(small[name]),
        )
        for name in big
    ]
    rows.append(
        Row(
            case=CASE,
            metric=f"projector catch-up to {cfg.scale_big:,} requests"
            f" ({big_growth['events_total']:,} events)",
            kind="rate",
            unit="events/s",
            value={"n": 1, "p50": big_growth["catch_up_events_per_s"]},
            floor_name=f"same, up to {cfg.scale_small:,} requests",
            floor={"n": 1, "p50": small_growth["catch_up_events_per_s"]},
            note=f"{big_growth['catch_up_s']:.0f} s",
            extra={"small": small_growth, "big": big_growth},
        )
    )
    rows.append(
        Row(
            case=CASE,
            metric=f"rebuild (bulk, with swap) of {rebuild['events']:,} events",
            kind="rate",
            unit="events/s",
            value={"n": 1, "p50": rebuild["rebuild"]},
            floor_name="raw SELECT of the same rows",
            floor={"n": 1, "p50": rebuild["raw"]},
            note=f"read+decode only: {rebuild['decode']:.0f}/s",
            extra=rebuild,
        )
    )
    rows.append(
        Row(
            case=CASE,
            metric=f"batched insert ({BATCH} requests a save) up to {cfg.scale_big:,} requests",
            kind="rate",
            unit="events/s",
            value={"n": 1, "p50": big_growth["insert_events_per_s"]},
            floor_name=f"same, up to {cfg.scale_small:,} requests",
            floor={"n": 1, "p50": small_growth["insert_events_per_s"]},
            note=f"{big_growth['insert_s']:.0f} s",
        )
    )
    return rows

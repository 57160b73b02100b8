"""Case 1: command ingest, POST /v1/requests -> 202, against a bare publish endpoint.

Forgeline: the gateway role alone in its own process (as `forgeline gateway`), with its API
key check, validation and JetStream publish (nothing consumes the commands, so nothing else
runs). Floor: `bench.floor_server`, a bare Starlette endpoint in its own uvicorn process doing
one JetStream publish of the same payload. Each on its own nats-server; the two are measured
in alternation, trial by trial, with the load generator in a child process:

- latency at a fixed rate (open loop, p50/p99 from each request's due time);
- maximum throughput: closed loop with `ingest_concurrency` requests in flight.

A third server, the floor's `POST /v1/null` (answers 202, publishes nothing), shows what the
load generator and uvicorn alone reach on this machine: no number above it is measurable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import (
    AUTH,
    Child,
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

CASE = "1 ingest"


def spawn_floor(st: Stack, name: str = "floor") -> Child:
    """Starts the floor server; wait_ready() gives its port."""
    return Child(
        name,
        [sys.executable, "-m", "bench.floor_server", st.nats(name)],
        bench_env(),
        st.dir("logs"),
    )


def start_floor(st: Stack, name: str = "floor") -> tuple[Child, str]:
    child = spawn_floor(st, name)
    return child, f"http://127.0.0.1:{child.wait_ready(60)}"


def fixed_rate(url: str, body: dict[str, object], cfg: Config, auth: bool) -> LoadResult:
    spec = LoadSpec(
        url=url,
        body=body,
        headers=AUTH if auth else {},
        mode="rate",
        rate=cfg.ingest_rate,
        count=int(cfg.ingest_rate * cfg.ingest_seconds),
        max_seconds=cfg.ingest_seconds,
        concurrency=256,
    )
    return run_in_child(spec, bench_env())


def closed_loop(url: str, body: dict[str, object], cfg: Config, auth: bool) -> LoadResult:
    spec = LoadSpec(
        url=url,
        body=body,
        headers=AUTH if auth else {},
        mode="closed",
        concurrency=cfg.ingest_concurrency,
        count=cfg.ingest_count,
        max_seconds=cfg.ingest_max_seconds,
    )
    return run_in_child(spec, bench_env())


def failures(results: list[LoadResult]) -> str:
    text = "; ".join(f for r in results if (f := r.failures()))
    return f"failures: {text}" if text else ""


def run(st: Stack, cfg: Config, repo: Path) -> list[Row]:
    body = submit_body(repo)
    floor = spawn_floor(st)  # starts while the gateway does
    try:
        fl = Forgeline(
            st,
            nats_url=st.nats("ingest"),
            database_url=st.database("ingest"),
            roles=("gateway",),
            name="ingest-gateway",
        )
    except BaseException:
        floor.stop()
        raise
    mine_rate: list[LoadResult] = []
    floor_rate: list[LoadResult] = []
    mine_max: list[LoadResult] = []
    floor_max: list[LoadResult] = []
    null_max: list[LoadResult] = []
    try:
        floor_url = f"http://127.0.0.1:{floor.wait_ready(60)}"
        for _ in range(cfg.trials):
            mine_rate.append(fixed_rate(fl.url + "/v1/requests", body, cfg, auth=True))
            floor_rate.append(fixed_rate(floor_url + "/v1/requests", body, cfg, auth=False))
            mine_max.append(closed_loop(fl.url + "/v1/requests", body, cfg, auth=True))
            floor_max.append(closed_loop(floor_url + "/v1/requests", body, cfg, auth=False))
            if not cfg.quick:
                null_max.append(closed_loop(floor_url + "/v1/null", body, cfg, auth=False))
    finally:
        fl.stop()
        floor.stop()
    rate = f"{cfg.ingest_rate:g}/s"
    conc = cfg.ingest_concurrency
    rows = [
        Row(
            case=CASE,
            metric=f"POST /v1/requests -> 202 at {rate}",
            kind="latency",
            unit="ms",
            value=latency_summary([x for r in mine_rate for x in r.latencies]),
            floor_name="bare Starlette + 1 JetStream publish",
            floor=latency_summary([x for r in floor_rate for x in r.latencies]),
            note=failures(mine_rate + floor_rate),
        ),
        Row(
            case=CASE,
            metric=f"max throughput, {conc} in flight",
            kind="rate",
            unit="req/s",
            value=rate_summary([r.throughput for r in mine_max]),
            floor_name="bare Starlette + 1 JetStream publish",
            floor=rate_summary([r.throughput for r in floor_max]),
            note=failures(mine_max + floor_max),
            extra={
                "latency_ms_at_max": latency_summary([x for r in mine_max for x in r.latencies]),
                "floor_latency_ms_at_max": latency_summary(
                    [x for r in floor_max for x in r.latencies]
                ),
            },
        ),
    ]
    if null_max:
        rows.append(
            Row(
                case=CASE,
                metric=f"(ceiling) load generator + uvicorn, no publish, {conc} in flight",
                kind="rate",
                unit="req/s",
                value=rate_summary([r.throughput for r in null_max]),
                floor_name="",
                floor=None,
                note="what this machine's HTTP path alone reaches",
            )
        )
    return rows

"""The servers fail under load: kill -9 of nats-server, a crash-restart of Postgres. Every role
rides it out (or is restarted by the supervisor); the client retries what was refused meanwhile
with its Idempotency-Key."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from domain.commands import RequestSpec
from domain.request import Request
from forgeline.bootstrap import open_store
from forgeline.cluster import NatsNode
from forgeline.embedded import EmbeddedPostgres, start_postgres
from tests.faults import scenario
from tests.faults.load import Load
from tests.faults.scenario import Plan, under_way
from tests.faults.stack import Deployment, deploy
from tests.helpers import wait_until

DOWN_S = 3.0  # the outage; the client's requests meanwhile are refused and retried


def test_kill_9_and_restart_nats_server(
    faults_pg: EmbeddedPostgres, repo: Path, scratch: Path
) -> None:
    plan = Plan("nats_restart", f"kill -9 of nats-server (single node); down {DOWN_S:.0f} s")
    nats = NatsNode(scratch / "nats")
    nats.start()

    def inject(deployment: Deployment, load: Load) -> None:
        under_way(deployment, load)
        nats.kill()
        time.sleep(DOWN_S)  # the outage itself, not a wait for a condition
        nats.restart()

    try:
        report = scenario.run(plan, deploy(plan.name, scratch, faults_pg, nats), repo, inject)
    finally:
        nats.stop()
    scenario.verdict(report, plan)


def _crash(pg: EmbeddedPostgres) -> None:
    """SIGQUIT to the postmaster is `pg_ctl stop -m immediate`: every backend quits at once,
    nothing is checkpointed, the next start runs crash recovery."""
    pid = int((pg.pgdata / "postmaster.pid").read_text().splitlines()[0])
    os.kill(pid, signal.SIGQUIT)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "the postmaster to exit")


def test_crash_and_restart_postgres(faults_pg: EmbeddedPostgres, repo: Path, scratch: Path) -> None:
    plan = Plan("postgres_restart", f"Postgres stopped -m immediate (a crash); down {DOWN_S:.0f} s")
    nats = NatsNode(scratch / "nats")
    nats.start()

    def inject(deployment: Deployment, load: Load) -> None:
        under_way(deployment, load)
        _crash(faults_pg)
        time.sleep(DOWN_S)
        start_postgres(faults_pg.data_dir)  # the same socket: every URL stays valid

    try:
        report = scenario.run(plan, deploy(plan.name, scratch, faults_pg, nats), repo, inject)
    finally:
        nats.stop()
    scenario.verdict(report, plan)


def test_a_store_whose_pooled_connections_all_died_saves_on_its_next_try(
    faults_pg: EmbeddedPostgres,
) -> None:
    """Connections are not checked before each use (no pre-ping): one that Postgres dropped
    fails its first use; then the whole pool is checked before the library tries again (10
    tries). With every connection the pool can hold (15, more than the tries) dropped by a
    crash of Postgres, the next save and read still succeed."""
    name = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(faults_pg.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    app = open_store(faults_pg.url(name))
    try:
        pool = app.recorder.datastore.pool
        everyone_connected = threading.Barrier(pool.max_size)

        def hold_a_connection() -> None:
            with app.recorder.datastore.get_connection() as conn:
                conn.execute("SELECT 1")
                everyone_connected.wait(timeout=30)

        holders = [threading.Thread(target=hold_a_connection) for _ in range(pool.max_size)]
        for holder in holders:
            holder.start()
        for holder in holders:
            holder.join()
        assert pool.get_stats()["pool_size"] == pool.max_size  # all open, all idle now

        _crash(faults_pg)
        start_postgres(faults_pg.data_dir)

        request, run = Request.submit(
            request_id=uuid.uuid4(),
            run_id=uuid.uuid4(),
            spec=RequestSpec(repo="/srv/repo", prompt="echo hi"),
            command_id="cmd-after-restart",
        )
        app.save(request, run)
        assert app.get_run(run.id) == run
    finally:
        app.close()

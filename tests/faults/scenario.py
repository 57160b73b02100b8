"""One fault scenario from start to verdict: start the roles, run the load, inject the fault
while it runs, wait for the system to settle, check the invariants, write the numbers to
tests/faults/results/<name>.json (docs/reliability.md is made from them), stop everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from forgeline.bootstrap import open_store
from forgeline.cluster import NatsNode
from tests.faults import checker
from tests.faults.checker import Report
from tests.faults.load import Load, LoadResult
from tests.faults.stack import LEASE_S, Deployment
from tests.helpers import wait_until

# FAULTS_RESULTS_DIR moves them (e.g. for a run whose numbers go into docs/reliability.md).
RESULTS_DIR = Path(os.environ.get("FAULTS_RESULTS_DIR") or Path(__file__).parent / "results")
TERMINAL_TOPICS = r"Run\.Run(Succeeded|Failed|Cancelled)$"

Inject = Callable[[Deployment, Load], None]


@dataclass(frozen=True)
class Plan:
    name: str
    injected: str  # what was done, for the report
    # "A few hundred" per scenario; FAULTS_REQUESTS changes it (e.g. a quick local run).
    requests: int = int(os.environ.get("FAULTS_REQUESTS") or 200)
    rate: float = 20.0  # submitted per second
    settle_timeout: float = 150.0  # for every accepted run to end, once the load is in
    allowed_unexpected: Sequence[str] = ()  # outcomes the fault may cause (see Report)


def run(plan: Plan, deployment: Deployment, repo: Path, inject: Inject) -> Report:
    report = Report(plan.name, plan.injected)
    began = time.monotonic()
    try:
        deployment.start()
        report.seconds["start"] = round(time.monotonic() - began, 1)
        mark = time.monotonic()
        load = Load(deployment.gateway_url, repo, plan.requests, rate=plan.rate, scenario=plan.name)
        load.start()
        inject(deployment, load)
        result = load.result()
        report.seconds["load"] = round(time.monotonic() - mark, 1)
        settle(deployment, result, plan.settle_timeout)
        report.seconds["settle"] = round(time.monotonic() - mark, 1)
        check(report, deployment, result)
        report.seconds["check"] = round(time.monotonic() - mark, 1)
    except BaseException:
        print(deployment.log_tails())
        raise
    finally:
        report.role_restarts = dict(deployment.restarts)
        report.stop_codes = deployment.stop()
        report.seconds["total"] = round(time.monotonic() - began, 1)
        write(report)
        keep_logs(deployment)
    return report


def under_way(deployment: Deployment, load: Load) -> None:
    """Waits for the moment to inject: a third of the load is in and at least two agents run
    on worker-1 (in its workspaces)."""
    wait_until(lambda: load.accepted_so_far >= load.n // 3, 60, "a third of the load")
    worker_dir = deployment.workspace_dirs()[0]
    wait_until(
        lambda: len(checker.leftover_agents(worker_dir)) >= 2,
        60,
        "two agents running on worker-1",
        interval=0.05,
    )


def accepted_runs_ended(database_url: str, run_ids: list[str]) -> int:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT originator_id) FROM forgeline_events"
            " WHERE originator_id = ANY(%s::uuid[]) AND topic ~ %s",
            (run_ids, TERMINAL_TOPICS),
        ).fetchone()
    return int(row[0]) if row else 0


def last_position(database_url: str) -> int:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT coalesce(max(notification_id), 0) FROM forgeline_events")
        found = row.fetchone()
    return int(found[0]) if found else 0


def settle(deployment: Deployment, load: LoadResult, timeout: float) -> None:
    """Waits (with a deadline) until every accepted run ended, the projector applied the whole
    store and nothing is left behind; a deadline passing is not an error here: the checks then
    report what did not settle (stuck, mismatching, leaked)."""
    url = deployment.database_url
    run_ids = [a.run_id for a in load.accepted]
    deadline = time.monotonic() + timeout

    def until(predicate: Callable[[], object]) -> None:
        with contextlib.suppress(AssertionError):
            wait_until(predicate, max(1.0, deadline - time.monotonic()), interval=0.5)

    until(lambda: accepted_runs_ended(url, run_ids) == len(run_ids))
    deadline = max(deadline, time.monotonic() + 30)
    until(lambda: checker.projector_position(url) >= last_position(url))
    until(lambda: not _leftovers(deployment))


def _leftovers(deployment: Deployment) -> list[Any]:
    found: list[Any] = checker.leftover_workspaces(deployment.workspace_dirs())
    found += checker.leftover_agents(deployment.root)
    docker_url = deployment.roles["worker-1"].env.get("DOCKER_HOST")
    installation = checker.installation(deployment.database_url)
    if docker_url and installation:
        found += checker.containers_of(docker_url, installation)
    return found


def check(report: Report, deployment: Deployment, load: LoadResult) -> None:
    app = open_store(deployment.database_url)
    try:
        facts = checker.read_store(app)
        checker.check_store(report, facts, load, LEASE_S)
        position = checker.projector_position(deployment.database_url)
        report.projection_mismatches = (
            checker.projection_mismatches(app, deployment.database_url)
            if position >= facts.last_position
            else facts.events  # never caught up: count every event as not applied
        )
    finally:
        app.close()
    nats_url = deployment.nats.url
    with contextlib.suppress(AssertionError):  # if not, stream_missing says how far behind
        wait_until(lambda: checker.stream_messages(nats_url) >= facts.events, 30, interval=0.5)
    checker.check_stream(report, facts, deployment.nats.url)
    report.leaked_workspaces = len(checker.leftover_workspaces(deployment.workspace_dirs()))
    report.leaked_agents = len(checker.leftover_agents(deployment.root))
    docker_url = deployment.roles["worker-1"].env.get("DOCKER_HOST")
    installation = checker.installation(deployment.database_url)
    if docker_url and installation:
        report.leaked_containers = len(checker.containers_of(docker_url, installation))
        report.engine_dead_containers = len(
            checker.containers_of(docker_url, installation, dead=True)
        )
    checker.finish(report)


def write(report: Report) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{report.scenario}.json"
    path.write_text(json.dumps(report.as_json(), indent=2, sort_keys=True) + "\n")


def keep_logs(deployment: Deployment) -> None:
    """The roles' logs of the last run of each scenario, beside its numbers (gitignored)."""
    target = RESULTS_DIR / "logs" / deployment.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(deployment.root / "logs", target)
    if isinstance(deployment.nats, NatsNode):
        shutil.copy(deployment.nats.log_path, target / "nats.log")
    else:
        for node in deployment.nats.nodes:
            shutil.copy(node.log_path, target / f"nats-{node.name}.log")


def verdict(report: Report, plan: Plan) -> None:
    """Fails the test with the numbers when an invariant broke."""
    problems = report.problems(plan.allowed_unexpected)
    assert not problems, f"{plan.name}: {problems}\n{json.dumps(report.as_json(), indent=2)}"

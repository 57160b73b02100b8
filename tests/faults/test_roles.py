"""kill -9 of a Forgeline role under load (a worker, the relay, the projector), started again as
a supervisor would: nothing accepted is lost, nothing is recorded twice, every run ends."""

from __future__ import annotations

import time
from pathlib import Path

from forgeline.cluster import NatsNode
from forgeline.embedded import EmbeddedPostgres
from tests.faults import scenario
from tests.faults.load import Load
from tests.faults.scenario import Plan, under_way
from tests.faults.stack import Deployment, deploy

DOWN_S = 3.0  # how long a killed relay or projector stays down (a backlog builds up meanwhile)


def _nats(scratch: Path) -> NatsNode:
    node = NatsNode(scratch / "nats")
    node.start()
    return node


def _run(plan: Plan, pg: EmbeddedPostgres, repo: Path, scratch: Path, inject: scenario.Inject):
    nats = _nats(scratch)
    try:
        report = scenario.run(plan, deploy(plan.name, scratch, pg, nats), repo, inject)
    finally:
        nats.stop()
    scenario.verdict(report, plan)
    return report


def test_kill_9_a_worker_mid_run(faults_pg: EmbeddedPostgres, repo: Path, scratch: Path) -> None:
    plan = Plan("worker_kill", "kill -9 of worker-1 while it runs agents; restarted after 1 s")

    def inject(deployment: Deployment, load: Load) -> None:
        under_way(deployment, load)
        deployment.kill("worker-1")

    report = _run(plan, faults_pg, repo, scratch, inject)
    # The runs worker-1 held were taken over: a second attempt, not a failure.
    assert report.recovered >= 1, report


def test_kill_9_the_relay(faults_pg: EmbeddedPostgres, repo: Path, scratch: Path) -> None:
    plan = Plan("relay_kill", f"kill -9 of the relay; down {DOWN_S:.0f} s, then restarted")

    def inject(deployment: Deployment, load: Load) -> None:
        under_way(deployment, load)
        with deployment.held_down("relay"):
            deployment.kill("relay")
            time.sleep(DOWN_S)  # the outage itself, not a wait for a condition

    _run(plan, faults_pg, repo, scratch, inject)


def test_kill_9_the_projector(faults_pg: EmbeddedPostgres, repo: Path, scratch: Path) -> None:
    plan = Plan("projector_kill", f"kill -9 of the projector; down {DOWN_S:.0f} s, then restarted")

    def inject(deployment: Deployment, load: Load) -> None:
        under_way(deployment, load)
        with deployment.held_down("projector"):
            deployment.kill("projector")
            time.sleep(DOWN_S)

    _run(plan, faults_pg, repo, scratch, inject)

"""The Docker engine restarts under load (Docker workspaces): every container it ran goes away
with it. Runs caught mid-way end or are retried by policy; the ones queued meanwhile wait for
the engine; no container is left behind once it is back.

The engine is one the suite starts for itself (tests/faults/dockerd.py), not the machine's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.cluster import NatsNode
from forgeline.embedded import EmbeddedPostgres
from forgeline.settings import Settings
from tests.faults import scenario
from tests.faults.conftest import short_dir
from tests.faults.dockerd import PrivateDockerd, dockerd_binary, machine_has_image
from tests.faults.load import FAILS, FAST, SLOW, Load
from tests.faults.scenario import Plan
from tests.faults.stack import Deployment, deploy
from tests.helpers import wait_until

pytestmark = pytest.mark.docker
DOWN_S = 3.0


def _unavailable(reason: str) -> None:
    """Skips, or fails in CI, where root, dockerd and the workspace image are guaranteed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI runs scripts/test.sh, which provides them", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def dockerd() -> Iterator[PrivateDockerd]:
    image = Settings().workspace_image
    if os.geteuid() != 0 or dockerd_binary() is None:
        _unavailable("needs root and dockerd to run an engine of its own")
    if not machine_has_image(image):
        _unavailable(f"the machine's engine has no {image} (forgeline image build)")
    engine = PrivateDockerd(short_dir("fl-dk-"))
    try:
        engine.start()
        engine.load_image(image)
        yield engine
    finally:
        engine.stop()
        engine.remove()


def test_restart_dockerd(
    faults_pg: EmbeddedPostgres, repo: Path, scratch: Path, dockerd: PrivateDockerd
) -> None:
    plan = Plan(
        "dockerd_restart",
        f"dockerd stopped (SIGTERM, its containers with it), down {DOWN_S:.0f} s, started again",
        requests=30,
        rate=4.0,
        # The engine's shutdown stops the containers of the runs under way: their agents die
        # with them, a fault of the workspace the run cannot survive (the executor's policy
        # decides; docs/reliability.md gives the numbers).
        allowed_unexpected=[f"{kind} failed/workspace_failed" for kind in (FAST, SLOW, FAILS)],
    )
    nats = NatsNode(scratch / "nats")
    nats.start()

    def inject(deployment: Deployment, load: Load) -> None:
        wait_until(lambda: load.accepted_so_far >= load.n // 3, 60, "a third of the load")
        wait_until(lambda: dockerd.running_containers() >= 2, 60, "two workspaces running")
        dockerd.restart(DOWN_S)

    try:
        deployment = deploy(
            plan.name, scratch, faults_pg, nats, provisioner="docker", docker_url=dockerd.url
        )
        report = scenario.run(plan, deployment, repo, inject)
    finally:
        nats.stop()
    scenario.verdict(report, plan)

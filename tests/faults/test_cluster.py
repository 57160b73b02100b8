"""A 3-node JetStream cluster with every stream replicated three times: kill -9 of the node
leading FORGELINE_EVENTS under load, then the same node started again (it catches up)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from broker import subjects
from broker.connection import connect
from forgeline.cluster import NatsCluster, NatsNode, wait_replicas_current
from forgeline.embedded import EmbeddedPostgres
from tests.faults import scenario
from tests.faults.load import Load
from tests.faults.scenario import Plan, under_way
from tests.faults.stack import Deployment, deploy

DOWN_S = 3.0
STREAMS = [subjects.COMMANDS_STREAM, subjects.EVENTS_STREAM, subjects.LOGS_STREAM]


async def _leader(url: str, stream: str) -> str:
    nc = await connect(url, name="faults-leader-probe")
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader, info
        return info.cluster.leader
    finally:
        await nc.close()


def test_kill_9_a_cluster_node(faults_pg: EmbeddedPostgres, repo: Path, scratch: Path) -> None:
    plan = Plan(
        "cluster_node_kill",
        f"3-node cluster, streams R3: kill -9 of the FORGELINE_EVENTS leader; down {DOWN_S:.0f} s",
    )
    cluster = NatsCluster(scratch / "nats", 3)
    cluster.start()
    killed: list[NatsNode] = []

    def inject(deployment: Deployment, load: Load) -> None:
        under_way(deployment, load)
        leader = asyncio.run(_leader(cluster.url, subjects.EVENTS_STREAM))
        node = next(n for n in cluster.nodes if n.name == leader)
        node.kill()
        killed.append(node)
        time.sleep(DOWN_S)  # the outage itself, not a wait for a condition
        node.restart()
        wait_replicas_current(node.url, STREAMS, timeout=60)

    try:
        deployment = deploy(plan.name, scratch, faults_pg, cluster, replicas=3)
        report = scenario.run(plan, deployment, repo, inject)
    finally:
        cluster.stop()
    assert killed, "the fault was never injected"
    scenario.verdict(report, plan)

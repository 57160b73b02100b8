"""Start-up against a JetStream cluster that is still forming: the roles wait for it instead of
exiting (the fault suite saw every role exit 1 at least once while a cluster elected leaders)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from broker import subjects
from broker.streams import StreamSettings, ensure_streams
from forgeline.cluster import NatsCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    made = NatsCluster(tmp_path / "nats")
    try:
        yield made
    finally:
        made.stop()


async def test_streams_are_declared_once_a_quorum_of_the_cluster_is_up(
    cluster: NatsCluster,
) -> None:
    first, *others = cluster.nodes
    first.start(wait=False)  # alone: no JetStream meta leader, API requests go unanswered
    nc = await nats.connect(first.url, connect_timeout=10, max_reconnect_attempts=-1)
    try:
        declaring = asyncio.create_task(
            ensure_streams(nc.jetstream(), StreamSettings(replicas=3), ready_within_s=120)
        )
        # Without a quorum nothing can be declared; the task must still be waiting, not failed.
        done, _ = await asyncio.wait({declaring}, timeout=3)
        assert not done, declaring.exception() if declaring.done() else None
        for node in others:
            node.start(wait=False)
        await asyncio.wait_for(declaring, timeout=110)
        info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
        assert info.config.num_replicas == 3
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def test_a_cluster_that_never_forms_is_an_error_after_the_wait(
    cluster: NatsCluster,
) -> None:
    first = cluster.nodes[0]
    first.start(wait=False)
    nc = await nats.connect(first.url, connect_timeout=10)
    try:
        with pytest.raises(Exception) as raised:
            await ensure_streams(nc.jetstream(), StreamSettings(replicas=3), ready_within_s=3)
        assert type(raised.value).__name__ in {
            "TimeoutError",
            "NoRespondersError",
            "ServiceUnavailableError",
        }
    finally:
        with contextlib.suppress(Exception):
            await nc.close()

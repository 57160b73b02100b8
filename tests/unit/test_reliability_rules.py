"""Pure rules of scheduling and recovery: what each hand-back costs a run, how v1 hand-backs
are read, the backoff's bounds, and when the engine breaker opens and closes."""

from __future__ import annotations

import asyncio
import json
from uuid import uuid4

import pytest

from broker.retry import backoff_s
from domain.application import Forgeline
from domain.run import Run
from domain.status import RequeueCause
from handlers.breaker import EngineBreaker
from tests.event_scenario import FIXTURES, stored_event


def running_run() -> Run:
    run = Run.queue(
        run_id=uuid4(), request_id=uuid4(), number=1, agent="shell", prompt="true", timeout_s=60
    )
    run.start_provisioning("w1")
    run.record_workspace("local", "0" * 40)
    run.start()
    return run


def test_only_lost_workers_count_toward_max_attempts_and_only_engine_failures_as_retries() -> None:
    run = running_run()
    run.requeue("worker shutdown", RequeueCause.SHUTDOWN)
    assert (run.lost_count, run.infra_retries) == (0, 0)
    run.start_provisioning("w2")
    run.requeue("the Docker engine does not answer", RequeueCause.INFRASTRUCTURE)
    run.start_provisioning("w2")
    run.requeue("worker_lost")
    assert (run.attempt, run.lost_count, run.infra_retries) == (3, 1, 1)

    app = Forgeline(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    app.save(run)
    again = app.get_run(run.id)
    assert (again.lost_count, again.infra_retries) == (1, 1)


def test_a_stored_v1_requeue_is_read_with_its_cause() -> None:
    row = json.loads((FIXTURES / "Run.RunRequeued.v1.json").read_text())
    app = Forgeline(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    event = app.mapper.to_domain_event(stored_event(row))
    assert event.cause == "worker_lost"  # type: ignore[attr-defined]
    row["state"]["reason"] = "worker shutdown"
    event = app.mapper.to_domain_event(stored_event(row))
    assert event.cause == "shutdown"  # type: ignore[attr-defined]


@pytest.mark.parametrize("failures", [1, 2, 3, 6, 40])
def test_backoff_doubles_with_jitter_and_stays_under_its_cap(failures: int) -> None:
    nominal = min(60.0, 2.0 * 2 ** (failures - 1))
    delays = [backoff_s(failures, base_s=2.0, cap_s=60.0) for _ in range(200)]
    assert all(0.5 * nominal <= d < 1.5 * nominal for d in delays)
    assert len(set(delays)) > 100  # jittered: retries that failed together do not align


async def test_the_breaker_opens_after_k_failures_in_a_row_and_closes_on_the_first_answer() -> None:
    engine_up = False
    probes = 0

    async def probe() -> None:
        nonlocal probes
        probes += 1
        if not engine_up:
            raise ConnectionError("no engine")

    breaker = EngineBreaker(probe, threshold=3, probe_interval_s=0.05)
    breaker.record_failure("down")
    breaker.record_success()  # a success in between resets the count
    breaker.record_failure("down")
    breaker.record_failure("down")
    assert not breaker.is_open
    breaker.record_failure("down")
    assert breaker.is_open

    stop = asyncio.Event()
    prober = asyncio.create_task(breaker.probe_while_open(stop))
    while probes < 3:
        await asyncio.sleep(0.01)
    assert breaker.is_open
    engine_up = True
    await asyncio.wait_for(breaker.wait_closed(), 2)
    stop.set()
    await asyncio.wait_for(prober, 2)
    assert breaker.failures == 0


def test_without_a_probe_the_breaker_never_opens() -> None:
    breaker = EngineBreaker(None, threshold=1)
    for _ in range(5):
        breaker.record_failure("down")
    assert not breaker.is_open

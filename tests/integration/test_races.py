"""Two writers racing on one Run aggregate, in two threads with stores of their own (as two
worker processes would), on real Postgres: no write is lost and no version is skipped."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

from domain.application import EVENTS_TABLE, Forgeline
from domain.commands import RequestSpec
from domain.errors import IllegalTransition
from domain.request import Request
from domain.run import Run
from domain.status import RunStatus
from forgeline.bootstrap import open_store
from handlers.store import decide_and_hold, decide_on_run


@pytest.fixture
def other_store(database_url: str) -> Iterator[Forgeline]:
    """A second store application on the same database: another process's view."""
    app = open_store(database_url)
    yield app
    app.close()


def queued_run(app: Forgeline) -> UUID:
    request, run = Request.submit(
        request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        spec=RequestSpec(repo="/srv/repo", prompt="echo hi"),
        command_id=f"cmd-{uuid.uuid4()}",
    )
    app.save(request, run)
    return run.id


def provisioned_run(app: Forgeline) -> UUID:
    run_id = queued_run(app)
    run = app.get_run(run_id)
    run.start_provisioning("worker-0")
    run.record_workspace("local", "0" * 40)
    app.save(run)
    return run_id


def run_history(database_url: str, run_id: UUID) -> list[tuple[int, str]]:
    """(version, event type) of every stored event of the run, in version order."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT originator_version, topic FROM {EVENTS_TABLE}"
            " WHERE originator_id = %s ORDER BY originator_version",
            (run_id,),
        ).fetchall()
    return [(int(version), str(topic).rsplit(".", 1)[-1]) for version, topic in rows]


def race(*jobs: Callable[[], Any]) -> list[Any]:
    """Runs the jobs in threads at once; each result is a value or the exception raised."""

    def outcome(job: Callable[[], Any]) -> Any:
        try:
            return job()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(outcome, jobs))


def test_two_writers_deciding_on_the_same_version_one_wins_the_other_gets_integrity_error(
    store: Forgeline, other_store: Forgeline, database_url: str
) -> None:
    run_id = queued_run(store)
    both_loaded = threading.Barrier(2, timeout=10)

    def claim(app: Forgeline, worker: str) -> str:
        run = app.get_run(run_id)
        both_loaded.wait()  # each decided on version 1: neither has seen the other's write
        run.start_provisioning(worker)
        app.save(run)
        return worker

    outcomes = race(lambda: claim(store, "worker-a"), lambda: claim(other_store, "worker-b"))

    winners = [o for o in outcomes if isinstance(o, str)]
    losers = [o for o in outcomes if isinstance(o, Exception)]
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(losers[0], IntegrityError)
    assert run_history(database_url, run_id) == [(1, "RunQueued"), (2, "ProvisioningStarted")]
    run = store.get_run(run_id)
    assert (run.status, run.worker, run.attempt) == (RunStatus.PROVISIONING, winners[0], 1)


class _NoWait:
    def wait(self) -> None:
        pass


NO_WAIT: Any = _NoWait()  # a Decider with no rival to wait for


class Decider:
    """A decision for decide_on_run that waits for its rival on its first try only, and counts
    how often it was asked to decide."""

    def __init__(self, decide: Callable[[Run], None], barrier: threading.Barrier) -> None:
        self._decide = decide
        self._barrier = barrier
        self.calls = 0

    def __call__(self, run: Run) -> None:
        self.calls += 1
        if self.calls == 1:
            self._barrier.wait()
        self._decide(run)


def test_loser_of_a_race_re_decides_on_the_fresh_run_and_both_facts_are_recorded(
    store: Forgeline, other_store: Forgeline, database_url: str
) -> None:
    """The worker starts the agent while the client's cancel arrives: neither fact is lost."""
    run_id = provisioned_run(store)
    barrier = threading.Barrier(2, timeout=10)
    start = Decider(lambda run: run.start(), barrier)
    cancel = Decider(lambda run: run.request_cancel("cancelled by client", "cmd-cancel"), barrier)

    outcomes = race(
        lambda: decide_on_run(store, run_id, start),
        lambda: decide_on_run(other_store, run_id, cancel),
    )

    assert outcomes == [None, None]
    assert sorted([start.calls, cancel.calls]) == [1, 2]  # the loser decided again
    history = run_history(database_url, run_id)
    assert [version for version, _ in history] == [1, 2, 3, 4, 5]  # contiguous, none lost
    assert history[:3] == [
        (1, "RunQueued"),
        (2, "ProvisioningStarted"),
        (3, "WorkspaceProvisioned"),
    ]
    assert sorted(kind for _, kind in history[3:]) == ["CancelRequested", "RunStarted"]
    run = store.get_run(run_id)
    assert run.status is RunStatus.RUNNING
    assert run.cancel_requested  # the worker's cancel watcher will stop the agent


def test_cancel_racing_a_claim_ends_in_one_consistent_story(
    store: Forgeline, other_store: Forgeline, database_url: str
) -> None:
    """A queued run: the client cancels while a worker claims it. Whoever wins, the loser's
    re-decision respects the winner's fact: a cancelled run is never claimed, and a claimed run
    gets a cancel request for its worker."""
    run_id = queued_run(store)
    barrier = threading.Barrier(2, timeout=10)
    claim = Decider(lambda run: run.start_provisioning("worker-a"), barrier)
    cancel = Decider(lambda run: run.request_cancel("cancelled by client", "cmd-cancel"), barrier)

    claimed, cancelled = race(
        lambda: decide_on_run(store, run_id, claim),
        lambda: decide_on_run(other_store, run_id, cancel),
    )

    assert cancelled is None  # a cancel is always taken
    history = run_history(database_url, run_id)
    assert [version for version, _ in history] == list(range(1, len(history) + 1))
    kinds = [kind for _, kind in history]
    run = store.get_run(run_id)
    if claim.calls == 2:  # the cancel won: the claim was re-decided and refused
        assert isinstance(claimed, IllegalTransition)
        assert kinds == ["RunQueued", "CancelRequested", "RunCancelled"]
        assert run.status is RunStatus.CANCELLED
    else:  # the claim won: the cancel was re-decided against a provisioning run
        assert cancel.calls == 2
        assert claimed is None
        assert kinds == ["RunQueued", "ProvisioningStarted", "CancelRequested"]
        assert (run.status, run.cancel_requested) == (RunStatus.PROVISIONING, True)


def test_many_workers_claiming_one_run_only_one_holds_it(database_url: str) -> None:
    """Eight workers see the same RunQueued and try to claim it through decide_on_run."""
    apps = [open_store(database_url) for _ in range(8)]
    try:
        run_id = queued_run(apps[0])
        barrier = threading.Barrier(len(apps), timeout=10)
        claims = [
            Decider(lambda run, n=n: run.start_provisioning(f"worker-{n}"), barrier)
            for n in range(len(apps))
        ]
        outcomes = race(
            *[
                lambda app=app, claim=claim: decide_on_run(app, run_id, claim)
                for app, claim in zip(apps, claims, strict=True)
            ]
        )
    finally:
        for app in apps:
            app.close()

    assert sum(o is None for o in outcomes) == 1
    assert all(isinstance(o, IllegalTransition) for o in outcomes if o is not None)
    assert run_history(database_url, run_id) == [(1, "RunQueued"), (2, "ProvisioningStarted")]


def test_a_claim_decided_on_a_held_run_the_client_cancelled_since_is_refused(
    store: Forgeline, other_store: Forgeline, database_url: str
) -> None:
    """The executor decides on the Run it holds, without a reload: when the client cancelled
    since, the save fails and the claim, decided again on the fresh run, is refused."""
    run_id = queued_run(store)
    held = store.get_run(run_id)
    decide_on_run(other_store, run_id, lambda r: r.request_cancel("by client", "cmd-cancel"))

    with pytest.raises(IllegalTransition):
        decide_and_hold(store, run_id, lambda r: r.start_provisioning("worker-a"), held=held)

    assert [kind for _, kind in run_history(database_url, run_id)] == [
        "RunQueued",
        "CancelRequested",
        "RunCancelled",
    ]


def test_decisions_on_a_held_run_record_every_fact_once_in_order_with_a_rival_between(
    store: Forgeline, other_store: Forgeline, database_url: str
) -> None:
    """An attempt's decisions chain on the Run it holds; a cancel request saved by another
    process between two of them is kept, and the next decision is taken on top of it."""
    run_id = queued_run(store)
    held = store.get_run(run_id)
    _, held = decide_and_hold(store, run_id, lambda r: r.start_provisioning("w"), held=held)
    start = Decider(lambda r: (r.record_workspace("local", "0" * 40), r.start()), NO_WAIT)
    _, held = decide_and_hold(store, run_id, start, held=held)
    assert start.calls == 1  # the held run was current: decided once, no reload
    decide_on_run(other_store, run_id, lambda r: r.request_cancel("by client", "cmd-cancel"))
    succeed = Decider(lambda r: r.succeed(0), NO_WAIT)
    _, held = decide_and_hold(store, run_id, succeed, held=held)

    assert succeed.calls == 2  # behind the store: decided again on the fresh run
    history = run_history(database_url, run_id)
    assert [version for version, _ in history] == [1, 2, 3, 4, 5, 6]
    assert [kind for _, kind in history[3:]] == ["RunStarted", "CancelRequested", "RunSucceeded"]
    assert held.status is RunStatus.SUCCEEDED and held.version == 6

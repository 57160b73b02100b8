"""The Run aggregate: its state machine, its guards, and its events' trip through the store."""

from __future__ import annotations

from collections.abc import Callable
from uuid import uuid4

import pytest

from domain.application import Forgeline
from domain.errors import IllegalTransition
from domain.run import Run
from domain.status import FailureCode, RunAction, RunStatus

S = RunStatus
A = RunAction

PATCH_STATS = {
    "sha256": "ab" * 32,
    "bytes": 42,
    "files_changed": 1,
    "insertions": 2,
    "deletions": 1,
}


def new_run(**overrides: object) -> Run:
    fields: dict[str, object] = {
        "run_id": uuid4(),
        "request_id": uuid4(),
        "number": 1,
        "agent": "shell",
        "prompt": "echo hi > hello.txt",
        "timeout_s": 60,
    }
    fields.update(overrides)
    return Run.queue(**fields)  # type: ignore[arg-type]


# How to bring a fresh run into each status, using legal steps only.
DRIVE: dict[RunStatus, Callable[[Run], None]] = {
    S.QUEUED: lambda run: None,
    S.PROVISIONING: lambda run: run.start_provisioning("worker-1"),
    S.RUNNING: lambda run: (
        run.start_provisioning("worker-1"),
        run.record_workspace("local", "c0ffee"),
        run.start(),
    ),
    S.SUCCEEDED: lambda run: (DRIVE[S.RUNNING](run), run.succeed(exit_code=0)),
    S.FAILED: lambda run: (DRIVE[S.RUNNING](run), run.fail(FailureCode.AGENT_FAILED, "boom")),
    S.CANCELLED: lambda run: (DRIVE[S.RUNNING](run), run.cancel("stop")),
}


def run_in(status: RunStatus) -> Run:
    """A run in `status`, with every event so far already collected (as if saved)."""
    run = new_run()
    DRIVE[status](run)
    assert run.status is status
    run.collect_events()
    return run


# Each action, called with plausible arguments.
ACT: dict[RunAction, Callable[[Run], None]] = {
    A.START_PROVISIONING: lambda run: run.start_provisioning("worker-2"),
    A.RECORD_WORKSPACE: lambda run: run.record_workspace("local", "beef"),
    A.START: lambda run: run.start(),
    A.RECORD_PATCH: lambda run: run.record_patch("diff --git a/x b/x\n", PATCH_STATS),
    A.SUCCEED: lambda run: run.succeed(exit_code=0),
    A.FAIL: lambda run: run.fail(FailureCode.TIMEOUT, "took too long"),
    A.CANCEL: lambda run: run.cancel("client asked"),
    A.REQUEST_CANCEL: lambda run: run.request_cancel("client asked", "cmd-1"),
    A.REQUEUE: lambda run: run.requeue("worker lost"),
    A.RECORD_USAGE: lambda run: run.record_usage(
        provider="openai", model="m", input_tokens=3, output_tokens=2, cost_usd=0.001
    ),
}

# The state machine as the contract states it, written out independently of domain.status:
# (status, action) -> (event types recorded, status reached). Every pair not listed is illegal.
LEGAL: dict[tuple[RunStatus, RunAction], tuple[tuple[str, ...], RunStatus]] = {
    (S.QUEUED, A.START_PROVISIONING): (("ProvisioningStarted",), S.PROVISIONING),
    (S.QUEUED, A.FAIL): (("RunFailed",), S.FAILED),
    (S.QUEUED, A.CANCEL): (("RunCancelled",), S.CANCELLED),
    (S.QUEUED, A.REQUEST_CANCEL): (("CancelRequested", "RunCancelled"), S.CANCELLED),
    (S.PROVISIONING, A.RECORD_WORKSPACE): (("WorkspaceProvisioned",), S.PROVISIONING),
    (S.PROVISIONING, A.START): (("RunStarted",), S.RUNNING),
    (S.PROVISIONING, A.FAIL): (("RunFailed",), S.FAILED),
    (S.PROVISIONING, A.CANCEL): (("RunCancelled",), S.CANCELLED),
    (S.PROVISIONING, A.REQUEST_CANCEL): (("CancelRequested",), S.PROVISIONING),
    (S.PROVISIONING, A.REQUEUE): (("RunRequeued",), S.QUEUED),
    (S.RUNNING, A.RECORD_PATCH): (("PatchProduced",), S.RUNNING),
    (S.RUNNING, A.SUCCEED): (("RunSucceeded",), S.SUCCEEDED),
    (S.RUNNING, A.FAIL): (("RunFailed",), S.FAILED),
    (S.RUNNING, A.CANCEL): (("RunCancelled",), S.CANCELLED),
    (S.RUNNING, A.REQUEST_CANCEL): (("CancelRequested",), S.RUNNING),
    (S.RUNNING, A.REQUEUE): (("RunRequeued",), S.QUEUED),
    # Usage is money spent: recorded whenever the proxy sees it, even after the run ended.
    (S.QUEUED, A.RECORD_USAGE): (("UsageRecorded",), S.QUEUED),
    (S.PROVISIONING, A.RECORD_USAGE): (("UsageRecorded",), S.PROVISIONING),
    (S.RUNNING, A.RECORD_USAGE): (("UsageRecorded",), S.RUNNING),
    (S.SUCCEEDED, A.RECORD_USAGE): (("UsageRecorded",), S.SUCCEEDED),
    (S.FAILED, A.RECORD_USAGE): (("UsageRecorded",), S.FAILED),
    (S.CANCELLED, A.RECORD_USAGE): (("UsageRecorded",), S.CANCELLED),
}

ALL_PAIRS = [(status, action) for status in RunStatus for action in RunAction]
LEGAL_PAIRS = [pair for pair in ALL_PAIRS if pair in LEGAL]
ILLEGAL_PAIRS = [pair for pair in ALL_PAIRS if pair not in LEGAL]


def pair_id(pair: tuple[RunStatus, RunAction]) -> str:
    return f"{pair[0].value}-{pair[1].name.lower()}"


def event_types(run: Run) -> list[str]:
    return [type(event).__name__ for event in run.collect_events()]


@pytest.mark.parametrize("pair", LEGAL_PAIRS, ids=pair_id)
def test_legal_action_records_its_events_and_reaches_its_status(
    pair: tuple[RunStatus, RunAction],
) -> None:
    status, action = pair
    run = run_in(status)
    if action is A.START:  # a run starts only once its workspace exists
        run.record_workspace("local", "c0ffee")
        run.collect_events()
    version = run.version
    expected_events, expected_status = LEGAL[pair]

    ACT[action](run)

    assert event_types(run) == list(expected_events)
    assert run.status is expected_status
    assert run.version == version + len(expected_events)


@pytest.mark.parametrize("pair", ILLEGAL_PAIRS, ids=pair_id)
def test_illegal_action_raises_and_records_nothing(pair: tuple[RunStatus, RunAction]) -> None:
    status, action = pair
    run = run_in(status)
    version = run.version

    with pytest.raises(IllegalTransition) as raised:
        ACT[action](run)

    assert raised.value.status == status
    assert status.value in str(raised.value)
    assert run.collect_events() == []
    assert run.version == version
    assert run.status is status


def test_a_new_run_is_queued_with_what_it_was_given() -> None:
    request_id, base = uuid4(), uuid4()
    run = new_run(request_id=request_id, number=3, timeout_s=90, base_run_id=base)

    assert event_types(run) == ["RunQueued"]
    assert run.status is S.QUEUED
    assert (run.request_id, run.number, run.timeout_s, run.base_run_id) == (
        request_id,
        3,
        90,
        base,
    )
    assert run.attempt == 0
    assert not run.is_terminal
    assert not run.cancel_requested


def test_start_before_the_workspace_exists_is_refused() -> None:
    run = run_in(S.PROVISIONING)

    with pytest.raises(IllegalTransition, match="workspace"):
        run.start()

    assert run.collect_events() == []
    assert run.status is S.PROVISIONING


def test_a_second_workspace_is_refused() -> None:
    run = run_in(S.PROVISIONING)
    run.record_workspace("local", "c0ffee")
    run.collect_events()

    with pytest.raises(IllegalTransition, match="second workspace"):
        run.record_workspace("docker", "beef")

    assert run.collect_events() == []
    assert (run.provisioner, run.base_commit) == ("local", "c0ffee")


def test_a_second_patch_is_refused() -> None:
    run = run_in(S.RUNNING)
    run.record_patch("first diff", PATCH_STATS)
    run.collect_events()

    with pytest.raises(IllegalTransition, match="second patch"):
        run.record_patch("second diff", {**PATCH_STATS, "sha256": "cd" * 32})

    assert run.collect_events() == []
    assert run.patch == "first diff"
    assert run.patch_sha256 == PATCH_STATS["sha256"]


def test_a_recorded_patch_is_kept_with_its_digest() -> None:
    run = run_in(S.RUNNING)
    assert not run.has_patch

    run.record_patch("diff --git a/x b/x\n", PATCH_STATS)

    (event,) = run.collect_events()
    assert isinstance(event, Run.PatchProduced)
    assert (event.files_changed, event.insertions, event.deletions, event.bytes) == (1, 2, 1, 42)
    assert run.has_patch
    assert run.patch == "diff --git a/x b/x\n"


def test_cancel_request_on_a_queued_run_cancels_it_at_once() -> None:
    run = run_in(S.QUEUED)

    run.request_cancel("client asked", "cmd-1")

    events = run.collect_events()
    assert [type(e).__name__ for e in events] == ["CancelRequested", "RunCancelled"]
    assert events[0].command_id == "cmd-1"  # type: ignore[attr-defined]
    assert run.status is S.CANCELLED
    assert run.is_terminal
    assert run.finished_at is not None


def test_cancel_request_on_a_running_run_only_asks_it_to_stop() -> None:
    run = run_in(S.RUNNING)

    run.request_cancel("client asked", "cmd-1")

    assert event_types(run) == ["CancelRequested"]
    assert run.status is S.RUNNING
    assert run.cancel_requested
    assert run.finished_at is None


@pytest.mark.parametrize("status", [S.PROVISIONING, S.RUNNING], ids=str)
def test_a_repeated_cancel_request_records_nothing(status: RunStatus) -> None:
    run = run_in(status)
    run.request_cancel("first", "cmd-1")
    run.collect_events()
    version = run.version

    run.request_cancel("second", "cmd-2")

    assert run.collect_events() == []
    assert run.version == version
    assert run.status is status


@pytest.mark.parametrize("status", [S.PROVISIONING, S.RUNNING], ids=str)
def test_requeue_returns_to_queued_and_the_next_attempt_is_numbered_two(
    status: RunStatus,
) -> None:
    run = run_in(status)
    assert run.attempt == 1

    run.requeue("worker lost")
    assert run.status is S.QUEUED
    assert run.base_commit is None  # the old workspace is gone

    run.collect_events()
    run.start_provisioning("worker-2")

    (event,) = run.collect_events()
    assert isinstance(event, Run.ProvisioningStarted)
    assert event.attempt == 2
    assert run.attempt == 2
    assert run.worker == "worker-2"


def test_a_requeued_run_provisions_and_starts_again() -> None:
    run = run_in(S.RUNNING)
    run.requeue("worker lost")
    run.start_provisioning("worker-2")
    run.record_workspace("docker", "beef")
    run.start()

    assert run.status is S.RUNNING
    assert (run.provisioner, run.base_commit) == ("docker", "beef")


def test_fail_keeps_the_exit_code_and_the_error() -> None:
    run = run_in(S.RUNNING)

    run.fail(FailureCode.AGENT_FAILED, "agent exited with 3", exit_code=3, log_lines=7)

    (event,) = run.collect_events()
    assert isinstance(event, Run.RunFailed)
    assert event.code == "agent_failed"
    assert run.status is S.FAILED
    assert run.exit_code == 3
    assert run.error == {"code": "agent_failed", "message": "agent exited with 3"}
    assert run.finished_at is not None


def test_fail_without_an_exit_code_leaves_it_empty() -> None:
    run = run_in(S.QUEUED)

    run.fail(FailureCode.REPO_UNREACHABLE, "no such repository")

    assert run.exit_code is None
    assert run.error == {"code": "repo_unreachable", "message": "no such repository"}


def test_succeed_keeps_the_exit_code_and_times() -> None:
    run = run_in(S.RUNNING)

    run.succeed(exit_code=0, log_lines=3, log_sha256="ff" * 32)

    assert run.status is S.SUCCEEDED
    assert run.exit_code == 0
    assert run.started_at is not None
    assert run.finished_at is not None
    assert run.started_at <= run.finished_at


@pytest.mark.parametrize("status", list(RunStatus), ids=str)
def test_a_run_reloaded_from_the_store_equals_the_saved_run(status: RunStatus) -> None:
    app = Forgeline(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    run = new_run(base_run_id=uuid4())
    DRIVE[status](run)
    app.save(run)

    loaded = app.get_run(run.id)

    assert loaded == run
    assert loaded is not run
    assert loaded.status is status
    assert loaded.version == run.version


def test_a_reloaded_run_keeps_uuids_dicts_and_patch() -> None:
    app = Forgeline(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    request_id, base = uuid4(), uuid4()
    run = new_run(request_id=request_id, base_run_id=base)
    DRIVE[S.RUNNING](run)
    run.record_patch("diff --git a/ü b/ü\n", PATCH_STATS)
    run.request_cancel("client asked", "cmd-1")
    run.fail(FailureCode.TIMEOUT, "took too long", exit_code=137)
    app.save(run)

    loaded = app.get_run(run.id)

    assert loaded == run
    assert loaded.request_id == request_id
    assert loaded.base_run_id == base
    assert loaded.error == {"code": "timeout", "message": "took too long"}
    assert loaded.exit_code == 137
    assert loaded.patch == "diff --git a/ü b/ü\n"
    assert loaded.cancel_requested
    assert loaded.started_at == run.started_at


def test_events_saved_in_two_batches_reload_to_the_latest_state() -> None:
    app = Forgeline(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    run = new_run()
    app.save(run)
    reloaded = app.get_run(run.id)
    DRIVE[S.RUNNING](reloaded)
    app.save(reloaded)

    latest = app.get_run(run.id)

    assert latest == reloaded
    assert latest.status is S.RUNNING
    assert latest.version == 4

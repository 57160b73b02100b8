"""The Request aggregate: submitting, and reruns on top of the latest run."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from domain.application import Forgeline
from domain.commands import RequestSpec
from domain.errors import RunStillActive
from domain.request import Request
from domain.run import Run
from domain.status import FailureCode, RunStatus

PATCH_STATS = {
    "sha256": "ab" * 32,
    "bytes": 42,
    "files_changed": 1,
    "insertions": 2,
    "deletions": 1,
}


def spec(**overrides: object) -> RequestSpec:
    fields: dict[str, object] = {
        "repo": "https://example.com/acme/widgets.git",
        "ref": "main",
        "prompt": "echo hello > hello.txt",
        "priority": 2,
        "timeout_s": 120,
        "labels": {"team": "core", "ticket": "FL-1"},
    }
    fields.update(overrides)
    return RequestSpec.model_validate(fields)


def submit(**overrides: object) -> tuple[Request, Run]:
    request, run = Request.submit(
        request_id=uuid4(), run_id=uuid4(), spec=spec(**overrides), command_id="cmd-submit"
    )
    request.collect_events()
    run.collect_events()
    return request, run


def to_running(run: Run) -> None:
    run.start_provisioning("worker-1")
    run.record_workspace("local", "c0ffee")
    run.start()


def succeed_with_patch(run: Run) -> None:
    to_running(run)
    run.record_patch("diff --git a/hello.txt b/hello.txt\n", PATCH_STATS)
    run.succeed(exit_code=0)


def fail_without_patch(run: Run) -> None:
    to_running(run)
    run.fail(FailureCode.AGENT_FAILED, "exit 1", exit_code=1)


def rerun(request: Request, latest: Run, prompt: str | None = None) -> Run:
    return request.rerun(run_id=uuid4(), prompt=prompt, command_id="cmd-rerun", latest=latest)


def test_submit_gives_a_request_and_its_first_run_with_the_specs_fields() -> None:
    request_id, run_id = uuid4(), uuid4()

    request, run = Request.submit(
        request_id=request_id,
        run_id=run_id,
        spec=spec(),
        command_id="cmd-1",
        idempotency_key="key-1",
    )

    assert [type(e).__name__ for e in request.collect_events()] == ["RequestSubmitted"]
    assert [type(e).__name__ for e in run.collect_events()] == ["RunQueued"]
    assert request.id == request_id
    assert (request.repo, request.ref, request.prompt) == (
        "https://example.com/acme/widgets.git",
        "main",
        "echo hello > hello.txt",
    )
    assert (request.agent, request.priority, request.timeout_s) == ("shell", 2, 120)
    assert request.labels == {"team": "core", "ticket": "FL-1"}
    assert request.idempotency_key == "key-1"
    assert request.run_ids == [run_id]
    assert request.latest_run_id == run_id

    assert run.id == run_id
    assert run.request_id == request_id
    assert run.number == 1
    assert run.status is RunStatus.QUEUED
    assert (run.agent, run.prompt, run.timeout_s) == ("shell", "echo hello > hello.txt", 120)
    assert run.base_run_id is None


def test_submit_with_defaults_uses_the_default_agent_priority_and_timeout() -> None:
    request, run = Request.submit(
        request_id=uuid4(),
        run_id=uuid4(),
        spec=RequestSpec(repo="/srv/repo", prompt="true"),
        command_id="cmd-1",
    )

    assert (request.agent, request.priority, request.ref) == ("shell", 3, None)
    assert request.labels == {}
    assert request.idempotency_key is None
    assert run.timeout_s == request.timeout_s == 3600


@pytest.mark.parametrize(
    "drive",
    [
        lambda run: None,
        lambda run: run.start_provisioning("worker-1"),
        to_running,
    ],
    ids=["queued", "provisioning", "running"],
)
def test_rerun_is_refused_while_the_latest_run_is_active(drive) -> None:  # type: ignore[no-untyped-def]
    request, run = submit()
    drive(run)
    version = request.version

    with pytest.raises(RunStillActive):
        rerun(request, run)

    assert request.collect_events() == []
    assert request.version == version
    assert request.run_ids == [run.id]


def test_rerun_after_success_builds_on_the_latest_runs_patch() -> None:
    request, first = submit()
    succeed_with_patch(first)

    second = rerun(request, first, prompt="echo more >> hello.txt")

    events = request.collect_events()
    assert [type(e).__name__ for e in events] == ["RerunRequested"]
    assert events[0].run_id == second.id  # type: ignore[attr-defined]
    assert second.number == 2
    assert second.base_run_id == first.id
    assert second.request_id == request.id
    assert second.status is RunStatus.QUEUED
    assert second.prompt == "echo more >> hello.txt"
    assert request.latest_run_id == second.id


def test_rerun_after_a_failed_run_without_patch_keeps_the_latest_base() -> None:
    request, first = submit()
    succeed_with_patch(first)
    second = rerun(request, first)
    fail_without_patch(second)

    third = rerun(request, second)

    assert third.number == 3
    assert third.base_run_id == first.id  # second made no patch: build on first's


def test_rerun_after_a_failed_first_run_starts_from_the_clean_ref() -> None:
    request, first = submit()
    fail_without_patch(first)

    second = rerun(request, first)

    assert second.base_run_id is None


def test_rerun_after_a_cancelled_run_is_allowed() -> None:
    request, first = submit()
    first.request_cancel("client asked", "cmd-cancel")
    assert first.status is RunStatus.CANCELLED

    second = rerun(request, first)

    assert second.number == 2


def test_rerun_without_prompt_reuses_the_original_prompt() -> None:
    request, first = submit(prompt="echo original > a.txt")
    succeed_with_patch(first)

    second = rerun(request, first, prompt=None)

    assert second.prompt == "echo original > a.txt"
    assert request.prompt == "echo original > a.txt"


def test_a_followup_prompt_does_not_replace_the_requests_prompt() -> None:
    request, first = submit(prompt="echo original > a.txt")
    succeed_with_patch(first)
    second = rerun(request, first, prompt="echo followup > b.txt")
    succeed_with_patch(second)

    third = rerun(request, second, prompt=None)

    assert third.prompt == "echo original > a.txt"


def test_run_ids_grow_with_each_rerun_in_order() -> None:
    request, first = submit()
    succeed_with_patch(first)
    second = rerun(request, first)
    succeed_with_patch(second)
    third = rerun(request, second)

    assert request.run_ids == [first.id, second.id, third.id]
    assert [first.number, second.number, third.number] == [1, 2, 3]
    assert request.latest_run_id == third.id


def test_rerun_against_a_run_that_is_not_the_latest_is_refused() -> None:
    request, first = submit()
    succeed_with_patch(first)
    second = rerun(request, first)
    fail_without_patch(second)
    request.collect_events()

    with pytest.raises(ValueError, match="latest"):
        rerun(request, first)

    assert request.collect_events() == []
    assert request.run_ids == [first.id, second.id]


def test_a_request_reloaded_from_the_store_equals_the_saved_request() -> None:
    app = Forgeline(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    request, first = Request.submit(
        request_id=uuid4(),
        run_id=uuid4(),
        spec=spec(labels={"team": "core"}),
        command_id="cmd-1",
        idempotency_key="key-1",
    )
    succeed_with_patch(first)
    second = rerun(request, first, prompt="echo more")
    app.save(request, first, second)

    loaded = app.get_request(request.id)

    assert loaded == request
    assert loaded.run_ids == [first.id, second.id]
    assert all(isinstance(run_id, UUID) for run_id in loaded.run_ids)
    assert loaded.labels == {"team": "core"}
    assert loaded.agent_options == {}
    assert app.get_run(second.id).base_run_id == first.id


def test_events_saved_together_are_stored_in_the_order_given_and_reload_the_aggregates() -> None:
    """save_events (the command handler's batch save) stores what save(*events) would."""
    app = Forgeline(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    first_request, first_run = Request.submit(
        request_id=uuid4(), run_id=uuid4(), spec=spec(), command_id="cmd-1"
    )
    second_request, second_run = Request.submit(
        request_id=uuid4(), run_id=uuid4(), spec=spec(prompt="echo two"), command_id="cmd-2"
    )
    events = [
        *first_request.collect_events(),
        *first_run.collect_events(),
        *second_request.collect_events(),
        *second_run.collect_events(),
    ]

    app.save_events(events)

    stored = [n.originator_id for n in app.recorder.select_notifications(start=1, limit=10)]
    assert stored == [first_request.id, first_run.id, second_request.id, second_run.id]
    assert app.get_request(second_request.id) == second_request
    assert app.get_run(first_run.id) == first_run

"""Regression tests for domain bugs found in review: each failed before its fix."""

from uuid import uuid4

import pytest
from pydantic import ValidationError

from domain.commands import RequestSpec, RerunRequest, RerunSpec
from domain.status import RunStatus as S
from tests.unit.test_run import PATCH_STATS, run_in


def test_retry_after_requeue_can_record_its_own_patch():
    run = run_in(S.RUNNING)
    run.record_patch("diff from the lost attempt", PATCH_STATS)
    run.requeue("worker lost")
    run.start_provisioning("worker-2")
    run.record_workspace("local", "c0ffee")
    run.start()
    run.record_patch("diff from the retry", {**PATCH_STATS, "sha256": "cd" * 32})
    assert run.patch == "diff from the retry"
    assert run.attempt == 2


def test_a_cancel_asked_before_a_requeue_ends_the_run():
    run = run_in(S.RUNNING)
    run.request_cancel("client asked", "cmd-1")
    run.requeue("worker lost")
    assert run.status is S.CANCELLED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"agent": "skynet"}, "agent"), ({"agent_options": {"model": "x"}}, "agent_options")],
)
def test_agent_errors_name_their_field(kwargs, field):
    with pytest.raises(ValidationError) as raised:
        RequestSpec(repo="/srv/repo", prompt="true", **kwargs)
    assert raised.value.errors()[0]["loc"] == (field,)


def test_a_blank_rerun_prompt_is_refused():
    with pytest.raises(ValidationError):
        RerunSpec(prompt="   ")
    with pytest.raises(ValidationError):
        RerunRequest(command_id="c", request_id=uuid4(), run_id=uuid4(), prompt="   ")

"""Failing tests showing domain bugs (NOT committed)."""
import pytest
from pydantic import ValidationError
from domain.commands import RequestSpec, RerunSpec, RerunRequest
from domain.status import RunStatus as S
from tests.unit.test_run import PATCH_STATS, run_in


def test_retry_after_requeue_can_record_its_own_patch():
    run = run_in(S.RUNNING)
    run.record_patch("diff from the lost attempt", PATCH_STATS)
    run.requeue("worker lost")
    run.start_provisioning("worker-2"); run.record_workspace("local", "c0ffee"); run.start()
    run.record_patch("diff from the retry", {**PATCH_STATS, "sha256": "cd" * 32})  # raises
    assert run.patch == "diff from the retry"


def test_cancel_requested_before_requeue_is_not_lost():
    run = run_in(S.RUNNING)
    run.request_cancel("client asked", "cmd-1")
    run.requeue("worker lost")
    assert run.status is S.CANCELLED or run.status is S.QUEUED and (
        run.request_cancel("again", "cmd-2") or run.status is S.CANCELLED)


@pytest.mark.parametrize("kw, field", [({"agent": "skynet"}, "agent"), ({"agent_options": {"model": "x"}}, "agent_options")])
def test_agent_errors_name_their_field(kw, field):
    with pytest.raises(ValidationError) as raised:
        RequestSpec(repo="/srv/repo", prompt="true", **kw)
    assert raised.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("model", [RerunSpec, lambda prompt: RerunRequest(command_id="c", request_id=__import__("uuid").uuid4(), run_id=__import__("uuid").uuid4(), prompt=prompt)])
def test_blank_rerun_prompt_is_refused(model):
    with pytest.raises(ValidationError):
        model(prompt="   ")

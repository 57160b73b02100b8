"""Run and request statuses, and the state machine that says which action each status allows."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    def as_request_status(self) -> str:
        """A request shows the status of its latest run; a succeeded run shows as patch_ready."""
        return "patch_ready" if self is RunStatus.SUCCEEDED else self.value


TERMINAL_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({RunStatus.QUEUED, RunStatus.PROVISIONING, RunStatus.RUNNING})
REQUEST_STATUSES = ("queued", "provisioning", "running", "patch_ready", "failed", "cancelled")


class RunAction(StrEnum):
    START_PROVISIONING = "start provisioning"
    RECORD_WORKSPACE = "record a provisioned workspace"
    START = "start"
    RECORD_PATCH = "record a patch"
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "be cancelled"
    REQUEST_CANCEL = "take a cancel request"
    REQUEUE = "be requeued"
    RECORD_USAGE = "record model usage"


_S = RunStatus
_A = RunAction

# The whole state machine of a run: an action not listed for a status is illegal.
ALLOWED_ACTIONS: dict[RunStatus, frozenset[RunAction]] = {
    _S.QUEUED: frozenset({_A.START_PROVISIONING, _A.FAIL, _A.CANCEL, _A.REQUEST_CANCEL}),
    _S.PROVISIONING: frozenset(
        {_A.RECORD_WORKSPACE, _A.START, _A.FAIL, _A.CANCEL, _A.REQUEST_CANCEL, _A.REQUEUE}
    ),
    _S.RUNNING: frozenset(
        {_A.RECORD_PATCH, _A.SUCCEED, _A.FAIL, _A.CANCEL, _A.REQUEST_CANCEL, _A.REQUEUE}
    ),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}
# Model usage is money spent: it is recorded whenever the LLM proxy sees it, in any status
# (a call still streaming when its attempt was handed back, or when the run ended).
for _status in RunStatus:
    ALLOWED_ACTIONS[_status] = ALLOWED_ACTIONS[_status] | {_A.RECORD_USAGE}


class FailureCode(StrEnum):
    """Why a run failed; clients branch on these, so they are part of the contract."""

    AGENT_FAILED = "agent_failed"
    TIMEOUT = "timeout"
    REPO_UNREACHABLE = "repo_unreachable"
    WORKSPACE_FAILED = "workspace_failed"
    WORKSPACE_UNAVAILABLE = "workspace_unavailable"
    PATCH_TOO_LARGE = "patch_too_large"
    WORKER_LOST = "worker_lost"
    BUDGET_EXCEEDED = "budget_exceeded"
    INTERNAL = "internal_error"


class RequeueCause(StrEnum):
    """Why an attempt was handed back (RunRequeued.cause)."""

    WORKER_LOST = "worker_lost"  # its worker stopped heartbeating: counts toward max attempts
    SHUTDOWN = "shutdown"  # its worker stopped cleanly: costs the run nothing
    INFRASTRUCTURE = "infrastructure"  # the workspace engine failed: retried with backoff

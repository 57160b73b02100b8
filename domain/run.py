"""The Run aggregate: one attempt at a request, from queued to a terminal status.

Every public method checks the state machine first (domain.status.ALLOWED_ACTIONS) and only
then triggers its event, so an illegal call raises IllegalTransition and records nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.errors import IllegalTransition
from domain.status import ALLOWED_ACTIONS, FailureCode, RequeueCause, RunAction, RunStatus


class Run(Aggregate):
    class RunQueued(Aggregate.Created):
        request_id: UUID
        number: int
        agent: str
        prompt: str
        timeout_s: int
        base_run_id: UUID | None  # whose patch this run starts from (reruns); None = clean ref

    class ProvisioningStarted(Aggregate.Event):
        attempt: int
        worker: str

        def apply(self, run: Run) -> None:
            run.status = RunStatus.PROVISIONING
            run.attempt = self.attempt
            run.worker = self.worker
            run.claimed_at_version = self.originator_version

    class WorkspaceProvisioned(Aggregate.Event):
        provisioner: str
        base_commit: str

        def apply(self, run: Run) -> None:
            run.base_commit = self.base_commit
            run.provisioner = self.provisioner

    class RunStarted(Aggregate.Event):
        def apply(self, run: Run) -> None:
            run.status = RunStatus.RUNNING
            run.started_at = self.timestamp

    class PatchProduced(Aggregate.Event):
        diff: str
        sha256: str
        bytes: int
        files_changed: int
        insertions: int
        deletions: int

        def apply(self, run: Run) -> None:
            run.patch_sha256 = self.sha256
            run.patch = self.diff

    class RunSucceeded(Aggregate.Event):
        exit_code: int
        log_lines: int
        log_sha256: str

        def apply(self, run: Run) -> None:
            run.status = RunStatus.SUCCEEDED
            run.exit_code = self.exit_code
            run.finished_at = self.timestamp

    class RunFailed(Aggregate.Event):
        code: str
        message: str
        exit_code: int | None
        log_lines: int
        log_sha256: str

        def apply(self, run: Run) -> None:
            run.status = RunStatus.FAILED
            run.exit_code = self.exit_code
            run.error = {"code": self.code, "message": self.message}
            run.finished_at = self.timestamp

    class CancelRequested(Aggregate.Event):
        # v2 added requested_by; stored v1 events are upcast when read.
        class_version = 2

        reason: str
        command_id: str
        requested_by: str | None = None  # who asked (the API key's id), when known

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["requested_by"] = None

        def apply(self, run: Run) -> None:
            run.cancel_requested = True

    class RunCancelled(Aggregate.Event):
        reason: str
        log_lines: int
        log_sha256: str

        def apply(self, run: Run) -> None:
            run.status = RunStatus.CANCELLED
            run.finished_at = self.timestamp

    class BudgetSet(Aggregate.Event):
        """What the run may spend on models (recorded right after RunQueued, when set)."""

        budget_usd: float | None
        max_tokens: int | None

        def apply(self, run: Run) -> None:
            run.budget_usd = self.budget_usd
            run.max_tokens = self.max_tokens

    class UsageRecorded(Aggregate.Event):
        """One model call through the LLM proxy, with the run's totals after it."""

        provider: str  # openai | anthropic
        model: str
        input_tokens: int
        output_tokens: int
        cost_usd: float
        total_input_tokens: int
        total_output_tokens: int
        total_cost_usd: float

        def apply(self, run: Run) -> None:
            run.input_tokens = self.total_input_tokens
            run.output_tokens = self.total_output_tokens
            run.cost_usd = self.total_cost_usd
            run.model_calls += 1

    class RunRequeued(Aggregate.Event):
        """The attempt was handed back (worker lost, worker stopping, infrastructure down);
        the run waits for another attempt."""

        # v2 added cause (a RequeueCause); stored v1 events are upcast from their reason.
        class_version = 2

        reason: str
        cause: str = RequeueCause.WORKER_LOST.value

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            shutdown = state.get("reason") == "worker shutdown"
            state["cause"] = (RequeueCause.SHUTDOWN if shutdown else RequeueCause.WORKER_LOST).value

        def apply(self, run: Run) -> None:
            # Counted per cause: only lost workers count against FORGELINE_MAX_ATTEMPTS, only
            # infrastructure failures against FORGELINE_INFRA_RETRIES.
            if self.cause == RequeueCause.WORKER_LOST:
                run.lost_count += 1
            elif self.cause == RequeueCause.INFRASTRUCTURE:
                run.infra_retries += 1
            # The lost attempt's workspace, patch and start are gone with it.
            run.status = RunStatus.QUEUED
            run.base_commit = None
            run.provisioner = None
            run.patch = None
            run.patch_sha256 = None
            run.started_at = None
            run.worker = None

    def __init__(
        self,
        request_id: UUID,
        number: int,
        agent: str,
        prompt: str,
        timeout_s: int,
        base_run_id: UUID | None,
    ) -> None:
        self.request_id = request_id
        self.number = number
        self.agent = agent
        self.prompt = prompt
        self.timeout_s = timeout_s
        self.base_run_id = base_run_id
        self.status = RunStatus.QUEUED
        self.attempt = 0
        self.worker: str | None = None
        self.claimed_at_version: int | None = None  # version of the latest ProvisioningStarted
        self.provisioner: str | None = None
        self.base_commit: str | None = None
        self.started_at: datetime | None = None
        self.finished_at: datetime | None = None
        self.exit_code: int | None = None
        self.error: dict[str, str] | None = None
        self.patch: str | None = None
        self.patch_sha256: str | None = None
        self.cancel_requested = False
        self.lost_count = 0  # attempts whose worker was lost (RunRequeued cause worker_lost)
        self.infra_retries = 0  # attempts handed back because the infrastructure failed
        self.budget_usd: float | None = None
        self.max_tokens: int | None = None
        self.model_calls = 0  # usage survives a requeue: it is money spent all the same
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_usd = 0.0

    @classmethod
    def queue(
        cls,
        *,
        run_id: UUID,
        request_id: UUID,
        number: int,
        agent: str,
        prompt: str,
        timeout_s: int,
        base_run_id: UUID | None = None,
        budget_usd: float | None = None,
        max_tokens: int | None = None,
    ) -> Run:
        run = cls._create(
            cls.RunQueued,
            id=run_id,
            request_id=request_id,
            number=number,
            agent=agent,
            prompt=prompt,
            timeout_s=timeout_s,
            base_run_id=base_run_id,
        )
        if budget_usd is not None or max_tokens is not None:
            run.trigger_event(cls.BudgetSet, budget_usd=budget_usd, max_tokens=max_tokens)
        return run

    # -- decisions -----------------------------------------------------------------------

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def has_patch(self) -> bool:
        return self.patch_sha256 is not None

    @property
    def has_usage(self) -> bool:
        return self.model_calls > 0

    @property
    def over_budget(self) -> bool:
        """True once the recorded usage went past the run's budget (cost or tokens)."""
        over_cost = self.budget_usd is not None and self.cost_usd > self.budget_usd
        tokens = self.input_tokens + self.output_tokens
        return over_cost or (self.max_tokens is not None and tokens > self.max_tokens)

    def budget_summary(self) -> str:
        parts = []
        if self.budget_usd is not None:
            parts.append(f"${self.cost_usd:.4f} of ${self.budget_usd:g}")
        if self.max_tokens is not None:
            parts.append(f"{self.input_tokens + self.output_tokens} of {self.max_tokens} tokens")
        return ", ".join(parts) or "no budget"

    def record_usage(
        self, *, provider: str, model: str, input_tokens: int, output_tokens: int, cost_usd: float
    ) -> None:
        self._require(RunAction.RECORD_USAGE)
        if input_tokens < 0 or output_tokens < 0 or cost_usd < 0:
            raise ValueError("usage cannot be negative")
        self.trigger_event(
            self.UsageRecorded,
            provider=provider,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost_usd,
            total_input_tokens=self.input_tokens + input_tokens,
            total_output_tokens=self.output_tokens + output_tokens,
            # Rounded to micro-dollars so the totals add up the same everywhere they are read.
            total_cost_usd=round(self.cost_usd + cost_usd, 6),
        )

    def start_provisioning(self, worker: str) -> None:
        self._require(RunAction.START_PROVISIONING)
        self.trigger_event(self.ProvisioningStarted, attempt=self.attempt + 1, worker=worker)

    def record_workspace(self, provisioner: str, base_commit: str) -> None:
        self._require(RunAction.RECORD_WORKSPACE)
        if self.base_commit is not None:
            raise IllegalTransition("Run", self.status, "record a second workspace")
        self.trigger_event(
            self.WorkspaceProvisioned, provisioner=provisioner, base_commit=base_commit
        )

    def start(self) -> None:
        self._require(RunAction.START)
        if self.base_commit is None:
            raise IllegalTransition("Run", self.status, "start before its workspace exists")
        self.trigger_event(self.RunStarted)

    def record_patch(self, diff: str, stats: dict[str, Any]) -> None:
        self._require(RunAction.RECORD_PATCH)
        if self.has_patch:
            raise IllegalTransition("Run", self.status, "record a second patch")
        self.trigger_event(self.PatchProduced, diff=diff, **stats)

    def succeed(self, exit_code: int, log_lines: int = 0, log_sha256: str = "") -> None:
        self._require(RunAction.SUCCEED)
        self.trigger_event(
            self.RunSucceeded, exit_code=exit_code, log_lines=log_lines, log_sha256=log_sha256
        )

    def fail(
        self,
        code: FailureCode,
        message: str,
        *,
        exit_code: int | None = None,
        log_lines: int = 0,
        log_sha256: str = "",
    ) -> None:
        self._require(RunAction.FAIL)
        self.trigger_event(
            self.RunFailed,
            code=code.value,
            message=message,
            exit_code=exit_code,
            log_lines=log_lines,
            log_sha256=log_sha256,
        )

    def request_cancel(self, reason: str, command_id: str, requested_by: str | None = None) -> None:
        """Asks the run to stop; a run no worker holds yet is cancelled at once."""
        self._require(RunAction.REQUEST_CANCEL)
        if self.cancel_requested:
            return  # asked already: a second ask changes nothing
        self.trigger_event(
            self.CancelRequested, reason=reason, command_id=command_id, requested_by=requested_by
        )
        if self.status is RunStatus.QUEUED:
            self.cancel(reason)

    def cancel(self, reason: str, log_lines: int = 0, log_sha256: str = "") -> None:
        self._require(RunAction.CANCEL)
        self.trigger_event(
            self.RunCancelled, reason=reason, log_lines=log_lines, log_sha256=log_sha256
        )

    def requeue(self, reason: str, cause: RequeueCause = RequeueCause.WORKER_LOST) -> None:
        """Hands the run back for another attempt; a run with a pending cancel ends instead."""
        self._require(RunAction.REQUEUE)
        if self.cancel_requested:
            self.cancel(f"cancelled by client ({reason} before the cancel took effect)")
            return
        self.trigger_event(self.RunRequeued, reason=reason, cause=cause.value)

    def _require(self, action: RunAction) -> None:
        if action not in ALLOWED_ACTIONS[self.status]:
            raise IllegalTransition("Run", self.status, action.value)

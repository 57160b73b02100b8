"""The Request aggregate: what a client asked for, and the runs made for it."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.commands import RequestSpec
from domain.errors import RunStillActive
from domain.run import Run

_RUN_BUDGET = {"budget_usd", "max_tokens"}


class Request(Aggregate):
    class RequestSubmitted(Aggregate.Created):
        # v2 added submitted_by; stored v1 events are upcast when read (docs/events.md).
        class_version = 2

        repo: str
        ref: str | None
        prompt: str
        agent: str
        agent_options: dict[str, Any]
        priority: int
        timeout_s: int
        labels: dict[str, str]
        idempotency_key: str | None
        command_id: str
        first_run_id: UUID
        submitted_by: str | None = None  # who asked (the API key's owner), when known

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["submitted_by"] = None

    class RerunRequested(Aggregate.Event):
        # v2 added requested_by; stored v1 events are upcast when read.
        class_version = 2

        run_id: UUID
        prompt: str | None
        command_id: str
        requested_by: str | None = None  # who asked (the API key's id), when known

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["requested_by"] = None

        def apply(self, request: Request) -> None:
            request.run_ids.append(self.run_id)

    def __init__(
        self,
        repo: str,
        ref: str | None,
        prompt: str,
        agent: str,
        agent_options: dict[str, Any],
        priority: int,
        timeout_s: int,
        labels: dict[str, str],
        idempotency_key: str | None,
        command_id: str,
        first_run_id: UUID,
        submitted_by: str | None = None,
    ) -> None:
        self.repo = repo
        self.ref = ref
        self.prompt = prompt
        self.agent = agent
        self.agent_options = agent_options
        self.priority = priority
        self.timeout_s = timeout_s
        self.labels = labels
        self.idempotency_key = idempotency_key
        self.submitted_by = submitted_by
        self.run_ids: list[UUID] = [first_run_id]

    @classmethod
    def submit(
        cls,
        *,
        request_id: UUID,
        run_id: UUID,
        spec: RequestSpec,
        command_id: str,
        idempotency_key: str | None = None,
        submitted_by: str | None = None,
    ) -> tuple[Request, Run]:
        """A new request and its first run, to be saved together."""
        request = cls._create(
            cls.RequestSubmitted,
            id=request_id,
            command_id=command_id,
            idempotency_key=idempotency_key,
            first_run_id=run_id,
            submitted_by=submitted_by,
            # The budget is the runs' (Run.BudgetSet): RequestSubmitted keeps its schema.
            **spec.model_dump(exclude=_RUN_BUDGET),
        )
        run = Run.queue(
            run_id=run_id,
            request_id=request_id,
            number=1,
            agent=spec.agent,
            prompt=spec.prompt,
            timeout_s=spec.timeout_s,
            budget_usd=spec.budget_usd,
            max_tokens=spec.max_tokens,
        )
        return request, run

    @property
    def latest_run_id(self) -> UUID:
        return self.run_ids[-1]

    def rerun(
        self,
        *,
        run_id: UUID,
        prompt: str | None,
        command_id: str,
        latest: Run,
        requested_by: str | None = None,
    ) -> Run:
        """A new run on top of the latest patch; refused while the latest run is active."""
        if latest.id != self.latest_run_id:
            raise ValueError("rerun must be decided against the request's latest run")
        if not latest.is_terminal:
            raise RunStillActive(f"run {latest.id} is still {latest.status}; cancel it first")
        self.trigger_event(
            self.RerunRequested,
            run_id=run_id,
            prompt=prompt,
            command_id=command_id,
            requested_by=requested_by,
        )
        return Run.queue(
            run_id=run_id,
            request_id=self.id,
            number=len(self.run_ids),
            agent=self.agent,
            prompt=prompt if prompt is not None else self.prompt,
            timeout_s=self.timeout_s,
            base_run_id=latest.id if latest.has_patch else latest.base_run_id,
            # Each run of a request gets the budget the request was submitted with.
            budget_usd=latest.budget_usd,
            max_tokens=latest.max_tokens,
        )

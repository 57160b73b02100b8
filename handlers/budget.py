"""A run's model budget and model access, as the executor applies them (docs/llm-proxy.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from domain.run import Run
from domain.status import FailureCode
from handlers.agents.base import Agent, LlmAccess
from handlers.workspaces.base import WorkspaceError

if TYPE_CHECKING:
    from handlers.proxy.access import LlmGrants


def llm_access(grants: LlmGrants | None, agent: Agent, run: Run) -> LlmAccess | None:
    """The proxy URLs and this attempt's token for an agent that calls a model; None else."""
    if not agent.needs_llm:
        return None
    if grants is None:
        raise WorkspaceError(
            f"agent {agent.name!r} calls a model, but this worker runs no LLM proxy"
        )
    return grants.for_run(run.id, run.attempt)


def budget_failure(
    run: Run, failure: FailureCode | None, message: str
) -> tuple[FailureCode | None, str]:
    """How a run ends given its fresh state: past its budget, it fails `budget_exceeded`
    whether its agent succeeded, failed on the proxy's refusal, or was stopped for it."""
    over = run.over_budget and failure in (None, FailureCode.AGENT_FAILED)
    if over or failure is FailureCode.BUDGET_EXCEEDED:
        return FailureCode.BUDGET_EXCEEDED, f"the run's budget is spent: {run.budget_summary()}"
    return failure, message

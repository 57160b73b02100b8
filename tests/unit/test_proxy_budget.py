"""Run budgets in the domain: what a request may ask for, what a run records and decides."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
from pydantic import ValidationError

from domain.commands import RequestSpec
from domain.request import Request
from domain.run import Run
from domain.status import FailureCode
from handlers.budget import budget_failure


def spec(**budget: Any) -> RequestSpec:
    return RequestSpec(repo="/srv/repo", prompt="p", **budget)


@pytest.mark.parametrize(
    "budget",
    [
        {"budget_usd": 0},
        {"budget_usd": -1},
        {"budget_usd": "1"},
        {"budget_usd": True},
        {"budget_usd": float("nan")},
        {"budget_usd": float("inf")},
        {"budget_usd": 100_001},
        {"max_tokens": 0},
        {"max_tokens": 1.5},
        {"max_tokens": "100"},
        {"max_tokens": False},
        {"max_tokens": 10**10},
    ],
)
def test_bad_budgets_are_refused(budget: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as refused:
        spec(**budget)
    assert {e["loc"][0] for e in refused.value.errors()} == set(budget)


def test_a_budget_is_the_runs_and_every_rerun_gets_it() -> None:
    request, run = Request.submit(
        request_id=uuid4(), run_id=uuid4(), spec=spec(budget_usd=0.5, max_tokens=1000),
        command_id="c",
    )  # fmt: skip
    assert [type(e).__name__ for e in run.collect_events()] == ["RunQueued", "BudgetSet"]
    assert not hasattr(request, "budget_usd")  # RequestSubmitted keeps its schema
    run.start_provisioning("w")
    run.fail(FailureCode.AGENT_FAILED, "x")
    rerun = request.rerun(run_id=uuid4(), prompt=None, command_id="c2", latest=run)
    assert (rerun.budget_usd, rerun.max_tokens) == (0.5, 1000)

    _, unbudgeted = Request.submit(request_id=uuid4(), run_id=uuid4(), spec=spec(), command_id="c")
    assert [type(e).__name__ for e in unbudgeted.collect_events()] == ["RunQueued"]


def running(**budget: Any) -> Run:
    run = Run.queue(
        run_id=uuid4(), request_id=uuid4(), number=1, agent="x", prompt="p", timeout_s=60, **budget
    )
    run.start_provisioning("w")
    run.record_workspace("local", "c0ffee")
    run.start()
    return run


def use(run: Run, tokens_in: int, tokens_out: int, cost: float) -> None:
    run.record_usage(
        provider="openai",
        model="m",
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost_usd=cost,
    )


def test_usage_adds_up_and_crossing_a_budget_is_seen() -> None:
    run = running(max_tokens=1000, budget_usd=0.01)
    use(run, 400, 100, 0.003)
    use(run, 400, 100, 0.003)
    assert (run.input_tokens, run.output_tokens, run.model_calls) == (800, 200, 2)
    assert not run.over_budget  # 1000 tokens: at the budget, not past it
    use(run, 1, 0, 0.0000001)
    assert run.over_budget
    assert run.budget_summary() == "$0.0060 of $0.01, 1001 of 1000 tokens"
    assert running(budget_usd=0.005).over_budget is False
    dollars = running(budget_usd=0.005)
    use(dollars, 1, 1, 0.0051)
    assert dollars.over_budget


def test_cost_totals_stay_exact_to_the_micro_dollar() -> None:
    run = running()
    for _ in range(10):
        use(run, 1, 1, 0.1)
    assert run.cost_usd == 1.0
    assert not run.over_budget  # no budget, never over


def test_usage_is_recorded_after_the_end_too_but_never_negative() -> None:
    run = running()
    run.succeed(0)
    use(run, 5, 5, 0.0)  # a reply that was still streaming when the run ended
    assert run.input_tokens == 5
    with pytest.raises(ValueError):
        use(run, -1, 0, 0.0)


def test_a_run_past_its_budget_fails_so_however_its_agent_ended() -> None:
    run = running(max_tokens=10)
    assert budget_failure(run, None, "ok") == (None, "ok")
    use(run, 11, 0, 0.0)
    for agent_outcome in (None, FailureCode.AGENT_FAILED, FailureCode.BUDGET_EXCEEDED):
        code, message = budget_failure(run, agent_outcome, "agent exited with code 1")
        assert code is FailureCode.BUDGET_EXCEEDED
        assert message == "the run's budget is spent: 11 of 10 tokens"
    # A timeout or a too large patch says more than the budget does.
    assert budget_failure(run, FailureCode.TIMEOUT, "t") == (FailureCode.TIMEOUT, "t")

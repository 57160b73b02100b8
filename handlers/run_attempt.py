"""One attempt of one run: provision, run the agent, record the patch and the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge, Histogram

from broker.logs import RunLogWriter
from broker.retry import backoff_s
from domain.errors import IllegalTransition
from domain.run import Run
from domain.status import FailureCode, RequeueCause, RunStatus
from handlers import log_context, tracing
from handlers.budget import budget_failure, llm_access
from handlers.store import decide_and_hold_async, load_run
from handlers.workspaces.base import (
    AgentTimedOut,
    RepoUnreachable,
    Workspace,
    WorkspaceError,
    WorkspaceSpec,
    WorkspaceUnavailable,
)
from handlers.workspaces.patch import patch_stats

if TYPE_CHECKING:
    from handlers.execution import Executor

log = logging.getLogger(__name__)

# In this process's default registry: the gateway's /metrics shows it when it runs in the same
# process as the worker (`forgeline up`); see docs/observability.md.
PROVISIONING_SECONDS = Histogram(
    "forgeline_provisioning_seconds",
    "Time to provision a run's workspace (retries included), in this process, by outcome.",
    ["provisioner", "outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
RUNS_ACTIVE = Gauge(
    "forgeline_runs_active", "Run attempts this process is executing now (worker slots in use)."
)


class RunAttempt:
    def __init__(self, executor: Executor, run: Run) -> None:
        self._x = executor
        self._run = run
        # The run as this attempt last saved it: its next decision is taken on it, without a
        # reload (handlers/store.py decide_and_hold); None when it must be reloaded.
        self._held: Run | None = run
        self._log = RunLogWriter(executor.js, run.id, attempt=run.attempt)
        self._workspace: Workspace | None = None
        self._attempt = run.attempt  # the fencing token: records only while it is current
        self.retry_after_s = 0.0  # when this attempt handed the run back: wait before the next
        self._over_budget = False  # the agent was stopped because the run's budget is spent

    async def go(self) -> None:
        with (
            log_context.bound(request_id=self._run.request_id, run_id=self._run.id),
            RUNS_ACTIVE.track_inprogress(),
        ):
            await self._go()

    @tracing.traced("attempt")
    async def _go(self) -> None:
        try:
            await self._provision_and_run()
        except WorkspaceUnavailable as exc:
            # The engine went away mid-run: an infrastructure failure, retried elsewhere.
            await self._quietly(self._hand_back_to_infrastructure(exc))
        except (WorkspaceError, OSError) as exc:
            # The workspace broke mid-run (e.g. the engine went away): fail, never loop.
            log.warning("run %s: workspace failed: %s", self._run.id, exc)
            code = (
                FailureCode.WORKSPACE_UNAVAILABLE
                if isinstance(exc, WorkspaceUnavailable)
                else FailureCode.WORKSPACE_FAILED
            )
            await self._fail_quietly(code, f"workspace failed: {exc}")
        except Exception as exc:
            log.exception("run %s: unexpected error", self._run.id)
            await self._fail_quietly(FailureCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            # The worker is stopping: hand the run back so another attempt picks it up.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._record(lambda r: r.requeue("worker shutdown", RequeueCause.SHUTDOWN))
                )
            raise
        finally:
            with contextlib.suppress(Exception):
                await self._log.flush()
            if self._workspace is not None:
                await asyncio.shield(self._workspace.close())

    async def _provision_and_run(self) -> None:
        app, run = self._x.app, self._run
        request = await self._x.request(run.request_id)
        spec = WorkspaceSpec(
            run_id=run.id, request_id=run.request_id, repo=request.repo, ref=request.ref
        )
        if run.base_run_id is not None:  # a rerun starts from the pinned commit plus a patch
            base = await load_run(app, run.base_run_id)
            spec = WorkspaceSpec(
                run_id=run.id,
                request_id=run.request_id,
                repo=request.repo,
                ref=base.base_commit,
                base_patch=base.patch,
            )
        # An agent that calls a model gets a workspace whose only network peer is the LLM proxy.
        spec = dataclasses.replace(spec, llm_proxy=self._x.agents[run.agent].needs_llm)
        await self._system(
            f"provisioning a {self._x.provisioner.name} workspace: "
            f"{request.repo} at {spec.ref or 'HEAD'} (attempt {run.attempt})"
        )
        began = time.monotonic()
        try:
            if run.attempt > 1 and self._x.discard is not None:
                # What an earlier attempt left (a container the engine could not remove).
                await self._x.discard(run.id)
            with tracing.step("provision"):
                self._workspace = await self._x.provisioner.provision(spec)
        except WorkspaceError as exc:
            PROVISIONING_SECONDS.labels(self._x.provisioner.name, "failed").observe(
                time.monotonic() - began
            )
            if isinstance(exc, WorkspaceUnavailable):
                await self._hand_back_to_infrastructure(exc)
                return
            code = (
                FailureCode.REPO_UNREACHABLE
                if isinstance(exc, RepoUnreachable)
                else FailureCode.WORKSPACE_FAILED
            )
            await self._fail(code, str(exc))
            return
        self._x.breaker.record_success()
        took = time.monotonic() - began
        PROVISIONING_SECONDS.labels(self._x.provisioner.name, "ok").observe(took)
        log.info("run %s: workspace provisioned in %.2f s", run.id, took)
        workspace = self._workspace
        await self._system(f"workspace ready at commit {workspace.base_commit}")

        def start(r: Run) -> None:
            r.record_workspace(self._x.provisioner.name, workspace.base_commit)
            r.start()

        try:
            await self._record(start)
        except IllegalTransition:
            return  # cancelled while provisioning: RunCancelled is recorded already
        await self._run_agent(workspace, dict(request.agent_options))

    async def _hand_back_to_infrastructure(self, exc: WorkspaceUnavailable) -> None:
        """The engine did not answer: the run goes back to the queue with a backoff (and the
        breaker counts the failure), until FORGELINE_INFRA_RETRIES hand-backs; then it fails."""
        self._x.breaker.record_failure(str(exc))
        settings = self._x.settings
        retries = self._run.infra_retries
        if retries >= settings.infra_retries:
            await self._fail(
                FailureCode.WORKSPACE_UNAVAILABLE,
                f"{exc} (gave up after {retries + 1} attempts)",
            )
            return
        delay = backoff_s(
            retries + 1, base_s=settings.infra_backoff_s, cap_s=settings.infra_backoff_max_s
        )
        await self._system(f"{exc}; handing the run back, next attempt in {delay:.1f} s")
        await self._log.flush()
        await self._record(lambda r: r.requeue(str(exc), RequeueCause.INFRASTRUCTURE))
        self.retry_after_s = delay

    async def _run_agent(self, workspace: Workspace, options: dict[str, Any]) -> None:
        run = self._run
        agent = self._x.agents[run.agent]
        agent_task = asyncio.create_task(
            tracing.agent_span(
                agent.run(
                    workspace,
                    prompt=run.prompt,
                    options=options,
                    on_line=self._log.write,
                    timeout_s=run.timeout_s,
                    llm=llm_access(self._x.llm, agent, run),
                )
            )
        )
        watcher = asyncio.create_task(self._cancel_when_asked(agent_task))
        try:
            exit_code = await agent_task
        except AgentTimedOut as exc:
            await self._system(str(exc))
            await self._finish(workspace, FailureCode.TIMEOUT, str(exc), None)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker is stopping, not the client
            if self._over_budget:
                await self._system("the run's budget is spent: the agent was stopped")
                await workspace.stop_agent()
                await self._finish(workspace, FailureCode.BUDGET_EXCEEDED, "", None)
                return
            await self._system("cancelled: the agent was stopped")
            await self._log.flush()
            await self._record(
                lambda r: r.cancel("cancelled by client", self._log.lines, self._log.sha256)
            )
        else:
            message = f"agent exited with code {exit_code}"
            if exit_code != 0 and (why := await workspace.describe_exit(exit_code)):
                message = f"{message}: {why}"
            await self._system(message)
            failure = FailureCode.AGENT_FAILED if exit_code != 0 else None
            await self._finish(workspace, failure, message, exit_code)
        finally:
            watcher.cancel()

    async def _cancel_when_asked(self, agent_task: asyncio.Task[int]) -> None:
        # Reads the store, not the event stream: a cancel is seen even while NATS is down.
        while not agent_task.done():
            await asyncio.sleep(self._x.settings.cancel_poll_s)
            with contextlib.suppress(Exception):
                latest = await load_run(self._x.app, self._run.id)
                if latest.cancel_requested or latest.over_budget:
                    self._over_budget = not latest.cancel_requested
                    agent_task.cancel()
                    return

    @tracing.traced("patch")  # the diff, its checks, and the outcome recorded
    async def _finish(
        self,
        workspace: Workspace,
        failure: FailureCode | None,
        message: str,
        exit_code: int | None,
    ) -> None:
        diff, numstat = await workspace.diff()
        stats = patch_stats(diff, numstat) if diff else None
        limit = self._x.settings.patch_max_bytes
        if stats and stats["bytes"] > limit:
            failure, stats = FailureCode.PATCH_TOO_LARGE, None
            message = f"the patch is larger than {limit} bytes (FORGELINE_PATCH_MAX_BYTES)"
        if stats:
            await self._system(
                f"patch: {stats['files_changed']} file(s) changed, "
                f"+{stats['insertions']} -{stats['deletions']}"
            )
        await self._log.flush()

        def decide(r: Run) -> None:
            if stats:
                r.record_patch(diff, stats)
            # A run past its budget fails so, however its agent ended (the patch is kept).
            code, why = budget_failure(r, failure, message)
            if code is None:
                r.succeed(exit_code or 0, self._log.lines, self._log.sha256)
            else:
                r.fail(
                    code,
                    why,
                    exit_code=exit_code,
                    log_lines=self._log.lines,
                    log_sha256=self._log.sha256,
                )

        await self._record(decide)

    async def _fail(self, code: FailureCode, message: str) -> None:
        await self._system(f"failed: {message}")
        await self._log.flush()
        await self._record(
            lambda r: r.fail(code, message, log_lines=self._log.lines, log_sha256=self._log.sha256)
        )

    async def _fail_quietly(self, code: FailureCode, message: str) -> None:
        """Records a failure if the run can still fail; a run already ended stays as it is."""
        with contextlib.suppress(IllegalTransition):
            await self._fail(code, message)

    @staticmethod
    async def _quietly(recording: Awaitable[None]) -> None:
        with contextlib.suppress(IllegalTransition):
            await recording

    async def _system(self, line: str) -> None:
        await self._log.write("system", line)

    async def _record(self, decide: Callable[[Run], None]) -> None:
        """Records decide's events while this attempt is the run's current one: once its
        lease was lost and the run was recovered, a late worker records nothing."""

        def fenced(run: Run) -> None:
            if run.attempt != self._attempt or run.status is RunStatus.QUEUED:
                raise IllegalTransition(
                    "Run", run.status, f"record for lost attempt {self._attempt}"
                )
            decide(run)

        held, self._held = self._held, None  # used up, whatever happens (see decide_and_hold)
        _, self._held = await decide_and_hold_async(self._x.app, self._run.id, fenced, held=held)

    @property
    def ended(self) -> Run | None:
        """The run as this attempt recorded its end; None if it did not (or cannot tell)."""
        return self._held if self._held is not None and self._held.is_terminal else None

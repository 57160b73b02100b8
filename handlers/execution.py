"""The executor: reacts to RunQueued/RunRequeued, provisions a workspace, runs the agent,
records the patch and the outcome.

Each worker takes at most `slots` runs at once. The trigger message stays unacknowledged
(with heartbeats) while its run is active, so a worker that dies gives the message back to the
stream. The worker that gets it next sees that the run was claimed right after that very
trigger, so its holder is gone: it requeues the run (a new attempt) or fails it `worker_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from uuid import UUID

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from broker import subjects
from broker.consumer import durable_config
from domain.application import Forgeline
from domain.errors import IllegalTransition
from domain.run import Run
from domain.status import FailureCode, RunStatus
from handlers import log_context
from handlers.agents.base import Agent
from handlers.proxy.access import LlmGrants
from handlers.run_attempt import RunAttempt
from handlers.store import decide_on_run_async, load_run
from handlers.workspaces.base import Provisioner

log = logging.getLogger(__name__)

# The consumer takes every Run event and skips all but these: one subject filter works on
# every nats-server, where a list of filters needs 2.10 or newer.
RUN_EVENTS = subjects.event_subject("Run", "*")
TRIGGERS = frozenset({"RunQueued", "RunRequeued"})


@dataclass(frozen=True)
class ExecutorSettings:
    worker: str = "worker"
    slots: int = 4
    max_attempts: int = 3
    patch_max_bytes: int = 4 * 1024 * 1024
    ack_wait_s: float = 30.0
    cancel_poll_s: float = 0.5
    shutdown_grace_s: float = 30.0
    provision_retries: int = 4


class Executor:
    def __init__(
        self,
        app: Forgeline,
        js: JetStreamContext,
        provisioner: Provisioner,
        agents: Mapping[str, Agent],
        settings: ExecutorSettings,
        llm: LlmGrants | None = None,
    ) -> None:
        self.app = app
        self.llm = llm  # how LLM agents reach the proxy; None: this worker runs none
        self.js = js
        self.provisioner = provisioner
        self.agents = agents
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.slots)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Takes runs while slots are free, until stop is set; then hands active runs back."""
        config = durable_config(
            subjects.EXECUTOR_DURABLE,
            [RUN_EVENTS],
            ack_wait_s=self.settings.ack_wait_s,
            max_deliver=-1,
        )
        await self.js.add_consumer(subjects.EVENTS_STREAM, config)
        sub = await self.js.pull_subscribe_bind(
            durable=subjects.EXECUTOR_DURABLE, stream=subjects.EVENTS_STREAM
        )
        try:
            while not stop.is_set():
                await self._slots.acquire()
                msg = await self._fetch_one(sub)
                if msg is None:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._handle_message(msg))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
        finally:
            await self._hand_back_active_runs()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _fetch_one(self, sub: JetStreamContext.PullSubscription) -> Msg | None:
        try:
            msgs = await sub.fetch(1, timeout=1.0)
        except (TimeoutError, NatsTimeoutError):
            return None
        except Exception:
            log.exception("executor: fetch failed; retrying in 1 s")
            await asyncio.sleep(1.0)
            return None
        return msgs[0]

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _hand_back_active_runs(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.shutdown_grace_s)

    async def _handle_message(self, msg: Msg) -> None:
        trigger = json.loads(msg.data)
        if trigger.get("aggregate") != "Run" or msg.subject.rsplit(".", 1)[-1] not in TRIGGERS:
            await msg.ack_sync()
            return
        run_id, version = UUID(trigger["aggregateid"]), int(trigger["version"])
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            await self.execute(run_id, version, redelivered=msg.metadata.num_delivered > 1)
        except asyncio.CancelledError:
            # Stopping: the attempt recorded RunRequeued (or left the run for recovery).
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.ack_sync())
            raise
        except Exception:
            log.exception("executor: run %s could not be processed; redelivering", run_id)
            await msg.nak(delay=2.0)
        else:
            await msg.ack_sync()
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.settings.ack_wait_s / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def execute(self, run_id: UUID, trigger_version: int, *, redelivered: bool) -> None:
        """Claims and runs one attempt of the run the trigger event names."""
        with log_context.bound(run_id=run_id):
            await self._execute(run_id, trigger_version, redelivered=redelivered)

    async def _execute(self, run_id: UUID, trigger_version: int, *, redelivered: bool) -> None:
        run = await load_run(self.app, run_id)
        if run.is_terminal:
            return
        if run.status is not RunStatus.QUEUED:
            if redelivered and run.claimed_at_version == trigger_version + 1:
                await self._recover_lost(run_id)  # claimed through this trigger; holder gone
            return  # else another worker holds it through a later trigger
        try:
            run = await decide_on_run_async(self.app, run_id, self._claim)
        except IllegalTransition:
            return  # another worker claimed it first
        await RunAttempt(self, run).go()

    def _claim(self, run: Run) -> Run:
        run.start_provisioning(self.settings.worker)
        return run

    async def _recover_lost(self, run_id: UUID) -> None:
        def decide(run: Run) -> None:
            if run.status is RunStatus.QUEUED or run.is_terminal:
                return
            if run.attempt < self.settings.max_attempts:
                run.requeue("worker_lost")
            else:
                run.fail(FailureCode.WORKER_LOST, f"worker lost {run.attempt} times; giving up")

        log.warning("executor: run %s lost its worker; recovering", run_id)
        await decide_on_run_async(self.app, run_id, decide)

"""The executor: queues runs as their RunQueued/RunRequeued events arrive, takes them from the
run queue in priority order while slots are free, provisions a workspace, runs the agent,
records the patch and the outcome.

Triggers only feed the queue (handlers/scheduling.py): their message is acknowledged once the
run has its row, so priorities, fairness and the global limit are decided in Postgres, not by
the order of the stream. A started run is held by a lease its worker renews every lease / 3;
a worker that dies stops renewing, and any worker recovers the run (handlers/recovery.py).
On stop, running agents get FORGELINE_SHUTDOWN_GRACE_S to finish; those still running then
are stopped and handed back (RunRequeued, cause shutdown: it costs the run no attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import anyio
from eventsourcing.application import AggregateNotFoundError
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker import subjects
from broker.consumer import Undeliverable, consume, durable_config
from domain.application import Forgeline
from domain.errors import IllegalTransition
from domain.request import Request
from domain.run import Run
from domain.status import RunStatus
from handlers import log_context, tracing
from handlers.agents.base import Agent
from handlers.breaker import EngineBreaker
from handlers.proxy.access import LlmGrants
from handlers.recovery import Discard, LostRunPolicy, Recovery
from handlers.retry_policy import HANDLER_RETRY
from handlers.run_attempt import RunAttempt
from handlers.scheduling import RunQueue
from handlers.store import decide_and_hold_async, load_run
from handlers.workspaces.base import Provisioner

log = logging.getLogger(__name__)

T = TypeVar("T")

_KEPT = 4_096  # requests (and queued runs) an executor keeps as loaded; one not kept is loaded
TRIGGERS = frozenset({"RunQueued", "RunRequeued"})
# A run that ends while it waits (a cancel of a queued run) leaves the queue at once, so that
# the positions of the runs behind it are right.
ENDED_WAITING = frozenset({"RunCancelled", "RunFailed"})
# The consumer is given only the Run events it acts on (a list of filters: nats-server 2.10 or
# newer; the wheel's is 2.15): the others (ProvisioningStarted, RunStarted, ...) were four of
# every five messages it fetched and acknowledged one by one, to skip them.
EXECUTOR_FILTERS = sorted(subjects.event_subject("Run", t) for t in TRIGGERS | ENDED_WAITING)


@dataclass(frozen=True)
class ExecutorSettings:
    worker: str = "worker"
    slots: int = 4
    max_attempts: int = 3
    patch_max_bytes: int = 4 * 1024 * 1024
    ack_wait_s: float = 30.0  # the lease: a run whose worker is silent this long is recovered
    cancel_poll_s: float = 0.5
    shutdown_grace_s: float = 30.0
    lost_run_policy: LostRunPolicy = "retry"
    infra_retries: int = 5  # attempts handed back because the engine failed, then it fails
    infra_backoff_s: float = 2.0
    infra_backoff_max_s: float = 60.0
    poll_s: float = 0.5  # how often an idle worker looks at the queue (others' runs)


class Executor:
    def __init__(
        self,
        app: Forgeline,
        js: JetStreamContext,
        provisioner: Provisioner,
        agents: Mapping[str, Agent],
        settings: ExecutorSettings,
        *,
        queue: RunQueue,
        breaker: EngineBreaker | None = None,
        discard: Discard | None = None,
        llm: LlmGrants | None = None,
    ) -> None:
        self.app = app
        self.llm = llm  # how LLM agents reach the proxy; None: this worker runs none
        self.js = js
        self.provisioner = provisioner
        self.agents = agents
        self.settings = settings
        self.queue = queue
        self.discard = discard
        self.breaker = breaker or EngineBreaker(None)
        self.recovery = Recovery(
            app,
            queue,
            worker=settings.worker,
            max_attempts=settings.max_attempts,
            policy=settings.lost_run_policy,
            discard=discard,
        )
        self._slots = asyncio.Semaphore(settings.slots)
        self._active: dict[UUID, asyncio.Task[None]] = {}
        self._work = asyncio.Event()  # set when a run was queued here: pick now
        self._settling: set[UUID] = set()  # runs whose attempt ended, being settled
        # Requests of runs queued here, as loaded then: an attempt reads only what a request
        # was submitted with (repo, ref, agent options), which no later event changes, so it
        # need not load the request again (a store read a run).
        self._requests: OrderedDict[UUID, Request] = OrderedDict()
        # Runs as loaded when queued here: the claim is decided on that copy first (a save at
        # its next version fails if anyone wrote since: then on a fresh load), not on a load.
        self._queued_runs: OrderedDict[UUID, Run] = OrderedDict()

    async def run(self, stop: asyncio.Event) -> None:
        """Queues and takes runs until stop is set; then lets active runs finish within the
        grace period and hands the others back."""
        await self.queue.create()
        done = asyncio.Event()  # heartbeats go on until every active run is settled
        helpers = [
            asyncio.create_task(self._consume_triggers(stop)),
            asyncio.create_task(self._renew_leases(done)),
            asyncio.create_task(self._recover_forever(stop)),
            asyncio.create_task(self.breaker.probe_while_open(stop)),
        ]
        try:
            await self._schedule(stop)
        finally:
            await self._stop_active_runs()
            done.set()
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    # -- queueing ---------------------------------------------------------------------------

    async def _consume_triggers(self, stop: asyncio.Event) -> None:
        # add_consumer updates a durable declared by an older version (one filter, Run.*).
        config = durable_config(subjects.EXECUTOR_DURABLE, EXECUTOR_FILTERS, ack_wait_s=30.0)
        while not stop.is_set():
            try:
                await consume(
                    self.js,
                    subjects.EVENTS_STREAM,
                    config,
                    self._enqueue,
                    stop,
                    batch=20,
                    retry=HANDLER_RETRY,
                )
            except Exception:
                log.exception("executor: the trigger consumer failed; restarting in 1 s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _enqueue(self, msg: Msg) -> None:
        event_type = msg.subject.rsplit(".", 1)[-1]
        if event_type not in TRIGGERS | ENDED_WAITING:
            return  # delivered under the old filter (Run.*) before the durable was updated
        try:
            trigger = json.loads(msg.data)
            run_id = UUID(trigger["aggregateid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise Undeliverable(f"not a run event: {exc}") from exc
        if event_type in ENDED_WAITING:
            self._queued_runs.pop(run_id, None)
            await self.queue.remove_waiting(run_id)
            return
        try:
            run = await load_run(self.app, run_id)
            request = await self.request(run.request_id)
        except AggregateNotFoundError as exc:
            raise Undeliverable(f"run {run_id} is not in this store") from exc
        if run.is_terminal:
            return  # a late copy of a trigger: nothing to run
        _keep(self._queued_runs, run_id, run)
        if await self.queue.enqueue(run_id, request.priority, request.labels):
            self._work.set()

    async def request(self, request_id: UUID) -> Request:
        """The request, as submitted (a run's attempt reads nothing a later event changes)."""
        request = self._requests.get(request_id)
        if request is None:
            request = await anyio.to_thread.run_sync(self.app.get_request, request_id)
        _keep(self._requests, request_id, request)
        return request

    # -- taking runs ------------------------------------------------------------------------

    async def _schedule(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await _slot_or_stop(self._slots, stop):
                break  # every slot may stay busy for long: stopping must not wait for one
            run_id = None
            try:
                if not self.breaker.is_open and not stop.is_set():
                    self._work.clear()
                    run_id = await self.queue.pick(self.settings.worker)
            except Exception as exc:
                log.warning("executor: could not read the run queue (%s); retrying", exc)
            if run_id is None:
                self._slots.release()
                await _first_of(stop, self._work, self.settings.poll_s)
                continue
            slot = _Slot(self._slots)
            task = asyncio.create_task(self._attempt(run_id, slot))
            self._active[run_id] = task
            task.add_done_callback(functools.partial(self._attempt_done, run_id, slot))

    def _attempt_done(self, run_id: UUID, slot: _Slot, task: asyncio.Task[None]) -> None:
        # The run may be running again here already (released, then picked by another slot).
        if self._active.get(run_id) is task:
            del self._active[run_id]
        slot.free()

    async def _attempt(self, run_id: UUID, slot: _Slot) -> None:
        with log_context.bound(run_id=run_id):
            async with tracing.executing(self.js, run_id):
                retry_after_s = 0.0
                ended: Run | None = None  # the run as this attempt last saved it, if ended
                try:
                    run = self._queued_runs.pop(run_id, None) or await load_run(self.app, run_id)
                    if run.status is RunStatus.QUEUED:
                        try:
                            with tracing.step("claim"):
                                run, _ = await decide_and_hold_async(
                                    self.app, run_id, self._claim, held=run
                                )
                        except IllegalTransition:
                            pass  # cancelled meanwhile: settled below
                        else:
                            attempt = RunAttempt(self, run)
                            await attempt.go()
                            retry_after_s = attempt.retry_after_s
                            ended = attempt.ended
                finally:
                    self._settling.add(run_id)  # its row may go now: not a lost lease
                    # Its agent is done: the next run may start while this one is settled
                    # (a queue statement and its commit, off the slot).
                    slot.free()
                    try:
                        await asyncio.shield(self._settle(run_id, retry_after_s, ended))
                    finally:
                        self._settling.discard(run_id)

    def _claim(self, run: Run) -> Run:
        run.start_provisioning(self.settings.worker)
        return run

    async def _settle(self, run_id: UUID, retry_after_s: float, ended: Run | None) -> None:
        """After an attempt: an ended run leaves the queue, a handed-back one goes back in
        its place; a run still active belongs to another attempt and keeps its lease.
        ended: the run as the attempt recorded its end (an ended run stays so: no reload)."""
        try:
            run = ended or await load_run(self.app, run_id)
            if run.is_terminal:
                await self.queue.remove(run_id)
            elif run.status is RunStatus.QUEUED:
                await self.queue.release(run_id, delay_s=retry_after_s)
                self._work.set()
            elif run.worker != self.settings.worker:
                await self.queue.hold(run_id, run.worker or "unknown")
        except Exception:
            # The lease runs out (nobody renews it now) and recovery settles the run.
            log.exception("executor: run %s could not be settled in the queue", run_id)

    # -- leases and recovery ----------------------------------------------------------------

    async def _renew_leases(self, done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.settings.ack_wait_s / 3)
            active = dict(self._active)
            if not active:
                continue
            try:
                held = await self.queue.renew(self.settings.worker, list(active))
            except Exception as exc:
                log.warning("executor: could not renew leases (%s); retrying", exc)
                continue
            for run_id in set(active) - held:
                task = active[run_id]
                if not task.done() and run_id not in self._settling:
                    log.error("run %s: lease lost to recovery; stopping this attempt", run_id)
                    task.cancel()

    async def _recover_forever(self, stop: asyncio.Event) -> None:
        interval = max(1.0, self.settings.ack_wait_s / 3)
        while not stop.is_set():
            try:
                if await self.recovery.recover_expired(mine=set(self._active)):
                    self._work.set()
            except Exception as exc:
                log.warning("executor: recovery round failed (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    # -- stopping ---------------------------------------------------------------------------

    async def _stop_active_runs(self) -> None:
        tasks = list(self._active.values())
        if not tasks:
            return
        grace = self.settings.shutdown_grace_s
        log.warning("stopping: waiting up to %g s for %d running run(s)", grace, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=grace)
        if not pending:
            return
        log.warning("stopping: handing %d run(s) back after the grace period", len(pending))
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=30.0)


def _keep(kept: OrderedDict[UUID, T], key: UUID, value: T) -> None:
    """Keeps value as the latest used, forgetting the least recently used past _KEPT."""
    kept[key] = value
    kept.move_to_end(key)
    if len(kept) > _KEPT:
        kept.popitem(last=False)


class _Slot:
    """One of the worker's slots, held by one attempt: freed once (when its agent is done, or
    at the latest when its task ends, however it ends)."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def free(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


async def _slot_or_stop(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Takes a slot (True), unless stop is set first (False, no slot taken)."""
    if not slots.locked():
        await slots.acquire()  # free now: no waiting, no helper tasks (the common case)
        return True
    acquiring = asyncio.ensure_future(slots.acquire())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not acquiring.done():
            acquiring.cancel()
    if acquiring.done() and not acquiring.cancelled():
        if not stop.is_set():
            return True
        slots.release()
    return False


async def _first_of(stop: asyncio.Event, work: asyncio.Event, timeout_s: float) -> None:
    """Waits until stop or work is set, or timeout_s passes."""
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(work.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()

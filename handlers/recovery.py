"""Recovering runs whose worker is gone: its lease in the run queue expired.

Every worker looks for expired leases every few seconds (`RunQueue.take_expired` hands each
to one of them). For each run, by what the store says:

- ended: its queue row is removed;
- queued: the holder died between its pick and its claim: the row goes back to the queue;
- provisioning or running: the holder died mid-attempt. Its workspace is removed first (the
  container labelled with the run id, or the local directory and its agent processes), so the
  lost agent cannot write on; then, by policy (FORGELINE_LOST_RUN_POLICY), the run is requeued
  for another attempt (`RunRequeued`, cause worker_lost) or failed `worker_lost`; a run lost
  FORGELINE_MAX_ATTEMPTS times fails in any case.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Literal
from uuid import UUID

from domain.application import Forgeline
from domain.run import Run
from domain.status import FailureCode, RequeueCause, RunStatus
from handlers import log_context
from handlers.scheduling import RunQueue
from handlers.store import decide_on_run_async, load_run

log = logging.getLogger(__name__)

Discard = Callable[[UUID], Awaitable[None]]  # removes whatever workspace a run left behind
LostRunPolicy = Literal["retry", "fail"]


class Recovery:
    def __init__(
        self,
        app: Forgeline,
        queue: RunQueue,
        *,
        worker: str,
        max_attempts: int,
        policy: LostRunPolicy = "retry",
        discard: Discard | None = None,
    ) -> None:
        self._app = app
        self._queue = queue
        self._worker = worker
        self._max_attempts = max_attempts
        self._policy = policy
        self._discard = discard

    async def recover_expired(self, mine: Collection[UUID] = ()) -> int:
        """Recovers every run whose lease expired; returns how many it took. Runs in mine
        are running here: their lease lapsed while the store was away, they are held again."""
        expired = await self._queue.take_expired(f"{self._worker} (recovering)")
        for lost in expired:
            if lost.holder == self._worker and lost.run_id in mine:
                await self._queue.hold(lost.run_id, self._worker)
                continue
            with log_context.bound(run_id=lost.run_id):
                try:
                    await self._recover(lost.run_id, lost.holder)
                except Exception:
                    # The lease taken above expires too: another round tries again.
                    log.exception("recovery of run %s failed; retried later", lost.run_id)
        return len(expired)

    async def _recover(self, run_id: UUID, holder: str) -> None:
        run = await load_run(self._app, run_id)
        if run.is_terminal:
            await self._queue.remove(run_id)
            return
        if run.status is RunStatus.QUEUED:
            await self._queue.release(run_id)
            return
        log.warning(
            "run %s: its worker %s stopped heartbeating (attempt %d); recovering",
            run_id,
            run.worker or holder,
            run.attempt,
        )
        if self._discard is not None:
            await self._discard(run_id)
        attempt = run.attempt

        def decide(current: Run) -> None:
            if current.is_terminal or current.status is RunStatus.QUEUED:
                return
            if current.attempt != attempt:
                return  # another attempt started meanwhile: not ours to judge
            lost = current.lost_count + 1
            if self._policy == "retry" and lost < self._max_attempts:
                current.requeue("worker_lost", RequeueCause.WORKER_LOST)
            else:
                current.fail(
                    FailureCode.WORKER_LOST,
                    f"worker {current.worker} lost during attempt {attempt}"
                    + (f" ({lost} times lost; giving up)" if self._policy == "retry" else ""),
                )

        await decide_on_run_async(self._app, run_id, decide)
        after = await load_run(self._app, run_id)
        if after.is_terminal:
            await self._queue.remove(run_id)
        elif after.status is RunStatus.QUEUED:
            await self._queue.release(run_id)
        else:  # held through a later attempt: that holder's lease
            await self._queue.hold(run_id, after.worker or holder)

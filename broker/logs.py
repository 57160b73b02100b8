"""Run output on FORGELINE_LOGS: one message per line, subject forgeline.log.<run_id>.

Lines are not domain state; the run's terminal event records how many there were and the
sha256 of the whole log, so an archived log can be checked against the history.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from broker import subjects

Stream = Literal["stdout", "stderr", "system"]
MAX_LINE_CHARS = 16_384
ACK_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


class RunLogWriter:
    """Publishes one run's lines in order; close() waits for every acknowledgement."""

    def __init__(self, js: JetStreamContext, run_id: UUID, *, attempt: int = 1) -> None:
        self._js = js
        self._run_id = run_id
        self._subject = subjects.log_subject(run_id)
        self._attempt = attempt
        self._pending: list[asyncio.Future[Any]] = []
        self._digest = hashlib.sha256()
        self.lines = 0
        self.lost = 0

    async def write(self, stream: Stream, line: str) -> None:
        self.lines += 1
        record = {
            "seq": self.lines,
            "stream": stream,
            "line": line[:MAX_LINE_CHARS],
            "ts": datetime.now(UTC).isoformat(),
        }
        payload = json.dumps(record, ensure_ascii=False).encode()
        self._digest.update(payload + b"\n")
        self._pending.append(
            await self._js.publish_async(
                self._subject,
                payload,
                stream=subjects.LOGS_STREAM,
                headers={"Nats-Msg-Id": f"{self._run_id}:{self._attempt}:{self.lines}"},
            )
        )
        if len(self._pending) >= 256:
            await self.flush()

    async def flush(self) -> None:
        """Waits for the acknowledgements; lines NATS lost (a server died holding them) are
        counted and logged, never allowed to hold up the run."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        done, unanswered = await asyncio.wait(pending, timeout=ACK_TIMEOUT_S)
        lost = len(unanswered) + sum(1 for f in done if f.exception() is not None)
        for future in unanswered:
            future.cancel()
        if lost:
            self.lost += lost
            log.warning("run %s: %d log line(s) not stored by NATS", self._run_id, lost)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


async def read_log(
    js: JetStreamContext,
    run_id: UUID,
    *,
    follow: bool,
    is_finished: Callable[[], Awaitable[bool]],
    idle_s: float = 0.5,
) -> AsyncIterator[dict[str, Any]]:
    """Yields the run's lines from the first; with follow, goes on until the run is finished.

    The executor publishes every line before it records the run's terminal event, so once
    the run is finished and the subscription has been idle, every line has been yielded.
    """
    sub = await js.subscribe(
        subjects.log_subject(run_id),
        stream=subjects.LOGS_STREAM,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_s)
            except TimeoutError:
                if not follow or await is_finished():
                    return
                continue
            yield json.loads(msg.data)
            if not follow and msg.metadata.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()

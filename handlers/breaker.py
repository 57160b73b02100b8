"""A circuit breaker around the workspace engine (Docker).

After `threshold` provisioning failures in a row because the engine did not answer, the
breaker opens: the executor stops taking runs (they stay queued, not failed) and a probe asks
the engine every `probe_interval_s` whether it answers again. The first answer closes the
breaker and provisioning resumes. The state is logged when it changes and exported as the
gauge `forgeline_engine_breaker_open` (in /metrics of a process that runs a worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

log = logging.getLogger(__name__)

BREAKER_OPEN = Gauge(
    "forgeline_engine_breaker_open",
    "1 while this worker pauses provisioning because the workspace engine does not answer.",
)

Probe = Callable[[], Awaitable[None]]  # raises when the engine does not answer


class EngineBreaker:
    def __init__(
        self,
        probe: Probe | None,
        *,
        threshold: int = 3,
        probe_interval_s: float = 5.0,
        probe_timeout_s: float = 5.0,
    ) -> None:
        self._probe = probe
        self.threshold = threshold
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.failures = 0
        self._closed = asyncio.Event()
        self._closed.set()
        BREAKER_OPEN.set(0)

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def record_success(self) -> None:
        self.failures = 0

    def record_failure(self, why: str) -> None:
        """An engine failure; the threshold-th in a row opens the breaker (with a probe)."""
        self.failures += 1
        if self._probe is None or self.is_open or self.failures < self.threshold:
            return
        self._closed.clear()
        BREAKER_OPEN.set(1)
        log.error(
            "engine breaker OPEN after %d failures in a row (%s): provisioning paused, runs stay"
            " queued; probing the engine every %g s",
            self.failures,
            why,
            self.probe_interval_s,
        )

    async def probe_while_open(self, stop: asyncio.Event) -> None:
        """Runs until stop: while the breaker is open, probes the engine every interval and
        closes the breaker when the engine answers."""
        while not stop.is_set():
            await _sleep(stop, self.probe_interval_s if self.is_open else 0.2)
            if stop.is_set() or not self.is_open or self._probe is None:
                continue
            try:
                async with asyncio.timeout(self.probe_timeout_s):
                    await self._probe()
            except Exception as exc:
                log.warning("engine breaker: the engine still does not answer: %s", exc)
                continue
            self.failures = 0
            self._closed.set()
            BREAKER_OPEN.set(0)
            log.warning("engine breaker CLOSED: the engine answers; provisioning resumes")


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

"""Watchers that sample the store from the bench's own process, every few ms, on one kept
connection, while a case runs (`async with SomeWatcher(url) as w: ...`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Self

import psycopg


class PollingWatcher:
    """Calls sample(conn, at) every poll_s from entering the block until leaving it."""

    def __init__(self, database_url: str, poll_s: float) -> None:
        self._url = database_url
        self._poll_s = poll_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._url, autocommit=True) as conn:
            while not self._stop.is_set():
                await self.sample(conn, time.perf_counter())
                await asyncio.sleep(self._poll_s)

    async def sample(self, conn: psycopg.AsyncConnection[Any], at: float) -> None:
        raise NotImplementedError

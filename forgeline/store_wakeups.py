"""Wake-ups on new events: Postgres LISTEN/NOTIFY instead of polling the notification log.

The relay and the projector follow the store's notification log. Polling it every 20 ms cost
up to 20 ms per hop of a run's way through the system (and queries while idle). Instead, a
statement-level trigger on the events table calls pg_notify at every insert; Postgres delivers
it when the inserting transaction commits, once per transaction. One listening connection per
process sets the asyncio.Event of every follower that subscribed; the followers still poll
every second, so a lost notification delays nothing by more than that.

When the listening connection is down (Postgres restarted, connection killed) or the trigger
could not be installed (a role that does not own the table), the events are set every
`poll_s` instead, which is the old polling: never slower than before, only not faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from domain.application import EVENTS_TABLE
from projections.schema import SCHEMA_LOCK_KEY

log = logging.getLogger(__name__)

CHANNEL = "forgeline_events"
NOTIFY_TRIGGER = "forgeline_events_notify"

_NOTIFY_FUNCTION_BODY = f"""
BEGIN
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END
"""


def install_notify_trigger(database_url: str) -> bool:
    """Creates the notify function and trigger when missing (idempotent, under the schema
    advisory lock); True when the trigger is there and enabled afterwards."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                state = _trigger_state(conn)
                if state is None:
                    conn.execute(
                        sql.SQL(
                            "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql"
                            " AS {body}"
                        ).format(
                            f=sql.Identifier(NOTIFY_TRIGGER),
                            body=sql.Literal(_NOTIFY_FUNCTION_BODY),
                        )
                    )
                    conn.execute(
                        sql.SQL(
                            "CREATE TRIGGER {t} AFTER INSERT ON {table} FOR EACH STATEMENT"
                            " EXECUTE FUNCTION {f}()"
                        ).format(
                            t=sql.Identifier(NOTIFY_TRIGGER),
                            table=sql.Identifier(EVENTS_TABLE),
                            f=sql.Identifier(NOTIFY_TRIGGER),
                        )
                    )
        except psycopg.errors.InsufficientPrivilege as exc:
            log.warning(
                "store wake-ups: cannot create the notify trigger as this role (%s); the relay"
                " and the projector poll the store instead",
                str(exc).splitlines()[0],
            )
        return _trigger_state(conn) in ("O", "A")


def _trigger_state(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute(
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s",
        (EVENTS_TABLE, NOTIFY_TRIGGER),
    ).fetchone()
    return None if row is None else str(row[0])


class StoreWakeups:
    """One LISTEN connection; sets every subscriber's event when events were committed."""

    def __init__(
        self,
        database_url: str,
        *,
        poll_s: float = 0.02,
        check_s: float = 5.0,
        reconnect_s: float = 1.0,
    ) -> None:
        self._url = database_url
        self._poll_s = poll_s  # how often subscribers are woken while notifications are off
        self._check_s = check_s  # how long the connection may be silent before a SELECT 1
        self._reconnect_s = reconnect_s
        self._subscribers: list[asyncio.Event] = []
        self.listening = False  # the connection is up and LISTENing (tests, metrics)
        self.backend_pid: int | None = None

    def subscribe(self) -> asyncio.Event:
        event = asyncio.Event()
        event.set()  # a first look at the store, whatever happened before
        self._subscribers.append(event)
        return event

    def idle_waiter(self, fallback_s: float = 1.0) -> Callable[[asyncio.Event], Awaitable[None]]:
        """For one follower: a wait that returns when events were committed since the last
        wait returned (or at once for the first), after fallback_s, or when stop is set."""
        event = self.subscribe()

        async def idle(stop: asyncio.Event) -> None:
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(event.wait())]
            try:
                await asyncio.wait(waiters, timeout=fallback_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                # Cleared as the follower goes to read: what commits from now wakes it again.
                event.clear()

        return idle

    def _wake_all(self) -> None:
        for event in self._subscribers:
            event.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Listens until stop is set; reconnects after a failure, polling meanwhile."""
        notify = await asyncio.to_thread(install_notify_trigger, self._url)
        poller = asyncio.create_task(self._poll_while_off(stop, forever=not notify))
        stopping = asyncio.create_task(stop.wait())
        try:
            while notify and not stop.is_set():
                listening = asyncio.create_task(self._listen())
                await asyncio.wait({listening, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not listening.done():  # stop was set
                    listening.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await listening
                    break
                self.listening, self.backend_pid = False, None
                log.warning(
                    "store wake-ups: listening failed (%s); polling until it listens again",
                    listening.exception(),
                )
                await _wait(stop, self._reconnect_s)
        finally:
            self.listening, self.backend_pid = False, None
            for task in (poller, stopping):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True)
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            self.backend_pid = conn.info.backend_pid
            self.listening = True
            self._wake_all()  # what was committed while nobody listened
            while True:
                async for _ in conn.notifies(timeout=self._check_s):
                    self._wake_all()
                # Silent for check_s: make sure the connection is still there.
                await conn.execute("SELECT 1")

    async def _poll_while_off(self, stop: asyncio.Event, *, forever: bool) -> None:
        while not stop.is_set():
            if forever or not self.listening:
                self._wake_all()
            await _wait(stop, self._poll_s)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

"""The events table's recorder: eventsourcing's own, sending a batch's rows in binary, and
checking its pool's connections when one fails rather than before each use.

eventsourcing's Postgres recorder inserts a save's events as one array of a composite type
(`unnest(%s::stored_event[])`). With `%s`, psycopg dumps that array as text: every row is
escaped in Python (a regex pass over each state's hex) and parsed back by Postgres, ~16 us
of this process's CPU an event, a quarter of the command handler's. In binary (`%b`) the same
rows cost ~2 us, and Postgres reads them without parsing. Everything else (the table lock
that keeps commit order equal to notification order, the notify, the ids read back, the
retries) is the library's, unchanged. Chosen by bootstrap's `eventsourcing_env`
(APPLICATION_RECORDER_TOPIC).

Connections are not checked before each use (POSTGRES_PRE_PING off: a round trip before every
store operation, 1.5-3 ms of CPU a run in a drain). A connection Postgres dropped (a restart)
fails its first use; then every idle connection of the pool is checked at once and the dead
ones replaced, before the library tries the operation again (10 tries, 0.2 s apart, each
waiting up to 30 s for a connection): without that, each dead connection would use up one
of those tries.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg.sql import SQL, Composed

log = logging.getLogger(__name__)

_TEXT_ROWS = "unnest(%s::"
_BINARY_ROWS = "unnest(%b::"


class BinaryInsertRecorder(PostgresApplicationRecorder):
    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        if datastore.enable_db_functions:  # its insert is a stored function, in text
            raise RuntimeError(
                "POSTGRES_ENABLE_DB_FUNCTIONS is not supported by Forgeline's event store"
            )
        # The library's statement as it built it (RETURNING included), its placeholder only
        # made binary; a library whose statement reads otherwise is refused, not half-used.
        statement = self.insert_events_statement.as_string(None)
        if statement.count(_TEXT_ROWS) != 1:
            raise RuntimeError(
                f"eventsourcing's insert statement changed ({statement!r}); "
                "forgeline/store_recorder.py must be updated for this version"
            )
        binary = statement.replace(_TEXT_ROWS, _BINARY_ROWS)
        self.insert_events_statement = Composed([SQL(binary)])
        _check_pool_on_failure(datastore)


def _check_pool_on_failure(datastore: PostgresDatastore) -> None:
    """Makes the datastore's connections check the whole pool when one fails (the module's
    doc says why). Every user of the store (saves, loads, the relay's and the projector's
    reads) takes its connections through get_connection."""
    get_connection = datastore.get_connection

    @contextlib.contextmanager
    def checked_on_failure() -> Iterator[Any]:
        try:
            with get_connection() as conn:
                yield conn
        except (OperationalError, InterfaceError):
            try:
                datastore.pool.check()  # closes and replaces the dead idle connections
            except psycopg.Error as exc:
                log.warning("the event store's connections could not be checked: %s", exc)
            raise

    datastore.get_connection = checked_on_failure  # type: ignore[method-assign]

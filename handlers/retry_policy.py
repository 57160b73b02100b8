"""Which failures of a handler are the infrastructure's (retried until it is back) rather
than the message's (dead-lettered after a few deliveries)."""

from __future__ import annotations

import eventsourcing.persistence as es
import nats.errors
import psycopg
from psycopg_pool import PoolTimeout

from broker.consumer import RetryPolicy

TRANSIENT: tuple[type[BaseException], ...] = (
    es.OperationalError,
    es.InterfaceError,
    es.ConnectionUnavailableError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    nats.errors.Error,
    OSError,
    TimeoutError,
)

HANDLER_RETRY = RetryPolicy(transient=TRANSIENT)

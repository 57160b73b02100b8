"""Connecting to NATS with the options every Forgeline process wants."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client

log = logging.getLogger(__name__)


async def connect(url: str, *, name: str) -> Client:
    """A connection that reconnects forever: a restarted nats-server must not end a worker.

    url may list several servers of a cluster, comma-separated (nats-py itself takes a list,
    not such a string): the client starts with whichever answers and fails over to the others.
    """

    client: list[Client] = []

    async def _disconnected() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            return  # our own shutdown
        log.warning("NATS disconnected (%s); reconnecting", name)

    async def _reconnected() -> None:
        log.info("NATS reconnected (%s)", name)

    async def _error(exc: Exception) -> None:
        log.warning("NATS error (%s): %s", name, exc)

    nc = await nats.connect(
        server_urls(url),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
        error_cb=_error,
    )
    client.append(nc)
    return nc


def server_urls(url: str) -> list[str]:
    """The servers of a comma-separated FORGELINE_NATS_URL, in order."""
    return [part.strip() for part in url.split(",") if part.strip()]

"""Connecting to NATS with the options every Forgeline process wants."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client

log = logging.getLogger(__name__)


async def connect(url: str, *, name: str) -> Client:
    """A connection that reconnects forever: a restarted nats-server must not end a worker."""

    async def _disconnected() -> None:
        log.warning("NATS disconnected (%s); reconnecting", name)

    async def _reconnected() -> None:
        log.info("NATS reconnected (%s)", name)

    async def _error(exc: Exception) -> None:
        log.warning("NATS error (%s): %s", name, exc)

    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
        error_cb=_error,
    )

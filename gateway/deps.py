"""What the gateway needs, handed in by the composition root."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from psycopg_pool import AsyncConnectionPool

from domain.application import Forgeline
from projections.views import Views


@dataclass(frozen=True)
class GatewayDeps:
    nc: Client
    js: JetStreamContext
    pool: AsyncConnectionPool[Any]
    views: Views
    app: Forgeline  # read-only use: decoding stored events for the events endpoint
    max_body_bytes: int = 1024 * 1024

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
    # Per API key: a burst, then so many a minute (0: no limit). See gateway/ratelimit.py.
    rate_limit_per_min: int = 0
    rate_limit_burst: int = 1
    # A key found valid is not looked up again for so long (0: every request); revoked
    # elsewhere, it keeps working that long here. See gateway/verified_keys.py.
    key_cache_s: float = 2.0
    # Browser origins allowed to call the API (CORS); none by default.
    cors_origins: tuple[str, ...] = ()

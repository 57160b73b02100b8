"""Per-key rate limit: a token bucket per API key, in the gateway process.

Each key may make `burst` requests at once, then `per_minute` a minute on average. Buckets live
in this process only: with several gateways behind a load balancer, a key gets that much from
each of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(
        self, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """per_minute 0 turns the limit off."""
        self.per_minute = per_minute
        self.burst = max(1, burst)
        self._rate = per_minute / 60.0  # tokens per second
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def take(self, key: str) -> int | None:
        """Takes a token for key: None when the request may go on, else the whole seconds to
        wait before a token is there again (for Retry-After)."""
        if not self.enabled:
            return None
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), at=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        # Whole seconds, rounded up (less a hair of float error: 10.000000001 s is 10 s).
        return max(1, math.ceil((1.0 - bucket.tokens) / self._rate - 1e-6))

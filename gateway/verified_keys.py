"""API keys this gateway process found valid in the store lately: a request whose key was
checked less than `ttl_s` ago is not checked against Postgres again.

The cost, said plainly: a key revoked elsewhere (`forgeline keys revoke`, another gateway)
keeps working here for at most `ttl_s` (FORGELINE_API_KEY_CACHE_S, 2 s by default; 0 turns
the cache off). A key revoked through this process stops at once: the revoke endpoint forgets
it here. Only keys found valid are kept (an unknown or revoked key is looked up every time, so
a key made a moment ago on another gateway works at once), by the digest of their secret,
never the secret itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.keys import ApiKey

MAX_KEYS = 10_000  # keys held at once: beyond it the expired ones go, then all of them


class VerifiedKeys:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._by_digest: dict[str, tuple[ApiKey, float]] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def get(self, secret_digest: str) -> ApiKey | None:
        """The key, when it was found valid less than ttl_s ago; else None (look it up)."""
        held = self._by_digest.get(secret_digest)
        if held is None:
            return None
        key, until = held
        if self._clock() >= until:
            del self._by_digest[secret_digest]
            return None
        return key

    def keep(self, secret_digest: str, key: ApiKey) -> None:
        """Remembers a key just found valid (not revoked) in the store."""
        if self.ttl_s <= 0 or key.revoked_at is not None:
            return
        now = self._clock()
        if len(self._by_digest) >= MAX_KEYS:
            self._by_digest = {d: h for d, h in self._by_digest.items() if h[1] > now}
            if len(self._by_digest) >= MAX_KEYS:
                self._by_digest.clear()
        self._by_digest[secret_digest] = (key, now + self.ttl_s)

    def forget(self, key_id: str) -> None:
        """Drops the key (revoked through this process): its next request is looked up."""
        self._by_digest = {d: h for d, h in self._by_digest.items() if h[0].id != key_id}

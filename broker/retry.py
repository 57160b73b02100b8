"""Backoff for retries: exponential, capped, with jitter so that retries of many runs or
messages that failed together do not come back together."""

from __future__ import annotations

import random


def backoff_s(failures: int, *, base_s: float, cap_s: float) -> float:
    """The wait before the retry after `failures` failures in a row (1 = the first):
    base * 2^(failures-1), at most cap, times a random factor in [0.5, 1.5)."""
    exponent = max(0, failures - 1)
    return min(cap_s, base_s * 2.0 ** min(exponent, 30)) * (0.5 + random.random())

"""The gateway's short-lived memory of keys found valid (gateway/verified_keys.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from gateway import verified_keys
from gateway.keys import ApiKey, Role
from gateway.verified_keys import VerifiedKeys

NOW = datetime(2026, 1, 1, tzinfo=UTC)
KEY = ApiKey("key_1", "ci", Role.OPERATOR, (), NOW, None, None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_valid_key_is_held_for_its_ttl_then_looked_up_again() -> None:
    clock = Clock()
    held = VerifiedKeys(2.0, clock)
    assert held.get("digest") is None
    held.keep("digest", KEY)
    clock.now += 1.9
    assert held.get("digest") == KEY
    clock.now += 0.1
    assert held.get("digest") is None  # a revocation elsewhere is seen from here on


def test_revoked_keys_and_a_ttl_of_zero_keep_nothing() -> None:
    clock = Clock()
    held = VerifiedKeys(2.0, clock)
    held.keep("revoked", replace(KEY, revoked_at=NOW))
    assert held.get("revoked") is None
    off = VerifiedKeys(0.0, clock)
    off.keep("digest", KEY)
    assert off.get("digest") is None


def test_forgetting_a_key_id_drops_it_at_once() -> None:
    held = VerifiedKeys(2.0, Clock())
    other = replace(KEY, id="key_2")
    held.keep("digest-1", KEY)
    held.keep("digest-2", other)
    held.forget("key_1")
    assert held.get("digest-1") is None
    assert held.get("digest-2") == other


def test_it_holds_a_bounded_number_of_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verified_keys, "MAX_KEYS", 3)
    clock = Clock()
    held = VerifiedKeys(2.0, clock)
    for i in range(3):
        held.keep(f"old-{i}", KEY)
    clock.now += 5  # the three expired: the fourth makes room by dropping them
    held.keep("new", KEY)
    assert held.get("new") == KEY and len(held) == 1
    for i in range(3):
        held.keep(f"fresh-{i}", KEY)  # none expired: all go
    assert len(held) == 1

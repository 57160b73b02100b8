"""The pure parts of auth: the token bucket, roles, key specs, secrets and digests."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.keys import ApiKey, KeySpec, Role, digest, generate_secret
from gateway.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_its_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [None, None, None]
    assert limiter.take("a") == 1  # one token a second: wait 1 s
    assert limiter.take("b") is None  # per key
    clock.now += 0.5
    assert limiter.take("a") == 1  # half a token: still round up to a whole second
    clock.now += 0.5
    assert limiter.take("a") is None
    clock.now += 3600
    assert [limiter.take("a") for _ in range(4)] == [None, None, None, 1]  # never above burst


def test_a_slow_rate_says_how_long_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=2, burst=1, clock=clock)
    assert limiter.take("k") is None
    assert limiter.take("k") == 30
    clock.now += 20
    assert limiter.take("k") == 10


def test_zero_per_minute_is_no_limit() -> None:
    limiter = RateLimiter(per_minute=0, burst=1)
    assert not limiter.enabled
    assert all(limiter.take("k") is None for _ in range(10_000))


def test_roles_are_ordered() -> None:
    assert Role.ADMIN.allows(Role.OPERATOR) and Role.ADMIN.allows(Role.VIEWER)
    assert Role.OPERATOR.allows(Role.VIEWER) and not Role.OPERATOR.allows(Role.ADMIN)
    assert not Role.VIEWER.allows(Role.OPERATOR)


def test_key_specs() -> None:
    spec = KeySpec(role=Role.VIEWER, projects=["b", "a", "b"], name="ci")
    assert spec.projects == ["a", "b"]
    for bad in (
        {"role": "admin", "projects": ["a"]},
        {"role": "viewer", "projects": ["a,b"]},
        {"role": "viewer", "projects": [""]},
        {"role": "viewer", "projects": [" lead"]},
        {"role": "viewer", "name": "x" * 101},
        {"role": "owner"},
    ):
        with pytest.raises(ValidationError):
            KeySpec.model_validate(bad)


def test_scoped_keys_see_only_their_projects() -> None:
    def key(*projects: str) -> ApiKey:
        return ApiKey("key_1", "", Role.VIEWER, projects, None, None, None)  # type: ignore[arg-type]

    assert key().may_see(None) and key().may_see("any")
    assert key("a").may_see("a") and not key("a").may_see("b") and not key("a").may_see(None)


def test_secrets_are_random_and_digests_hide_them() -> None:
    one, two = generate_secret(), generate_secret()
    assert one != two and one.startswith("fl_") and len(one) >= 43
    assert len(digest(one)) == 64 and one not in digest(one)
    assert digest(one) == digest(one) != digest(two)

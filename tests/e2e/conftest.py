"""Fixtures of the end-to-end tests: one `forgeline up` per test module, and an HTTP client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.support import Instance, short_tmp_dir
from tests.helpers import wait_until


def stop_cleanly(instance: Instance) -> None:
    """SIGTERM: exit code 0 within 30 s, and nothing of its process group left behind."""
    assert instance.proc is not None
    pgid = instance.proc.pid
    code = instance.stop(timeout=30)
    assert code == 0, f"forgeline up exited with {code} on SIGTERM:\n{instance.log_tail()}"
    wait_until(lambda: not instance.group_alive(pgid), 5, "forgeline's children to exit")


@pytest.fixture(scope="module")
def forgeline() -> Iterator[Instance]:
    """A `forgeline up` with embedded servers in a short temp dir, ready (GET /readyz == 200)."""
    instance = Instance(short_tmp_dir())
    try:
        instance.start(ready_timeout=60)
        yield instance
        stop_cleanly(instance)
    finally:
        instance.cleanup()


@pytest.fixture(scope="module")
def api(forgeline: Instance) -> Iterator[httpx.Client]:
    with forgeline.client() as client:
        yield client

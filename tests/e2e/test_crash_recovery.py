"""SIGTERM or kill -9 of `forgeline up` (and its NATS) mid-request; after a restart on the same
data dir, the requests still complete with their patches, once."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import stop_cleanly
from tests.e2e.support import (
    Instance,
    all_requests,
    apply_to_clone,
    events,
    make_repo,
    short_tmp_dir,
    submit,
    tree_files,
    wait_request,
    wait_run,
)
from tests.helpers import wait_until

SLOW_SCRIPT = """\
echo "working"
sleep 2
printf 'survived\\n' > result.txt
echo "finished"
"""


@pytest.fixture
def instance() -> Iterator[Instance]:
    instance = Instance(short_tmp_dir())
    try:
        yield instance
    finally:
        instance.cleanup()


def _check_completed(
    api: httpx.Client, repo: Path, accepted: dict[str, Any], clone: Path, attempts: set[int]
) -> None:
    view = wait_request(api, accepted["request_id"], timeout=90)
    assert view["status"] == "patch_ready", view
    run = api.get(f"/v1/runs/{accepted['run_id']}").json()
    assert run["status"] == "succeeded", run
    assert run["attempt"] in attempts, run
    assert [r["id"] for r in view["runs"]] == [accepted["run_id"]]

    patch = api.get(f"/v1/runs/{accepted['run_id']}/patch").text
    apply_to_clone(repo, patch, clone)
    assert tree_files(clone) == {"README.md": "# crash\n", "result.txt": "survived\n"}

    history = events(api, accepted["request_id"])
    types = [e["type"] for e in history]
    assert types.count("RequestSubmitted") == 1, types
    assert types.count("RunSucceeded") == 1, types
    assert types[-1] == "RunSucceeded", types
    if run["attempt"] == 2:
        assert "RunRequeued" in types, types
    positions = [e["position"] for e in history]
    assert positions == sorted(positions)


def test_requests_survive_sigterm_and_kill_9(instance: Instance, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"README.md": "# crash\n"})
    instance.start()

    # SIGTERM while a run is going: a clean stop lets it finish (the grace period is 30 s).
    with instance.client() as api:
        stopped = submit(api, repo, SLOW_SCRIPT)
        wait_run(api, stopped["run_id"], {"running"}, timeout=30)
    stop_cleanly(instance)
    instance.start()
    with instance.client() as api:
        _check_completed(api, repo, stopped, tmp_path / "clone-stopped", {1})

    # kill -9 of everything: one request is mid-run, another was accepted a moment ago.
    with instance.client() as api:
        running = submit(api, repo, SLOW_SCRIPT)
        wait_run(api, running["run_id"], {"running"}, timeout=30)
        just_accepted = submit(api, repo, SLOW_SCRIPT)
    instance.kill()

    instance.start()  # same data dir, same port
    with instance.client() as api:
        _check_completed(api, repo, just_accepted, tmp_path / "clone-accepted", {1, 2})
        # A run whose worker died is recovered once its lease (15 s) runs out.
        _check_completed(api, repo, running, tmp_path / "clone-running", {2})
        listed = sorted(item["id"] for item in all_requests(api))
        assert listed == sorted(r["request_id"] for r in (stopped, running, just_accepted))
    stop_cleanly(instance)


def _processes(argv: list[str]) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().split(b"\0")[: len(argv)] == [
                    a.encode() for a in argv
                ]:
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_the_agent_of_a_killed_worker_does_not_run_on(instance: Instance, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"README.md": "# crash\n"})
    marker = f"45.{uuid.uuid4().int % 10**6:06d}"
    try:
        instance.start()
        with instance.client() as api:
            accepted = submit(api, repo, f"sleep {marker}\n")
            wait_run(api, accepted["run_id"], {"running"}, timeout=30)
            wait_until(lambda: _processes(["sleep", marker]), 10, "the agent to start")
        instance.kill()
        instance.start()
        wait_until(lambda: not _processes(["sleep", marker]), 5, "the lost agent to be stopped")
    finally:
        for pid in _processes(["sleep", marker]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

"""kill -9 of `forgeline up` (and its NATS) mid-request; after a restart on the same data dir,
the request still completes with its patch, once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


def test_requests_survive_kill_9_and_restart(instance: Instance, tmp_path: Path) -> None:
    """One request is mid-run, another was accepted a moment ago, when everything is killed."""
    repo = make_repo(tmp_path / "repo", {"README.md": "# crash\n"})
    instance.start()
    with httpx.Client(base_url=instance.url, timeout=30.0) as api:
        running = submit(api, repo, SLOW_SCRIPT)
        wait_run(api, running["run_id"], {"running"}, timeout=30)
        just_accepted = submit(api, repo, SLOW_SCRIPT)
    instance.kill()

    instance.start()  # same data dir, same port
    with httpx.Client(base_url=instance.url, timeout=30.0) as api:
        for n, accepted in enumerate([just_accepted, running]):
            # A run whose worker died is redelivered once its ack wait (30 s) runs out.
            view = wait_request(api, accepted["request_id"], timeout=90)
            assert view["status"] == "patch_ready", (view, instance.log_tail())
            run = api.get(f"/v1/runs/{accepted['run_id']}").json()
            assert run["status"] == "succeeded", run
            assert run["attempt"] in (1, 2), run
            if accepted is running:
                assert run["attempt"] == 2, "the attempt that was killed counts"
            assert [r["id"] for r in view["runs"]] == [accepted["run_id"]]

            patch = api.get(f"/v1/runs/{accepted['run_id']}/patch").text
            clone = apply_to_clone(repo, patch, tmp_path / f"clone{n}")
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
        listed = [item["id"] for item in all_requests(api)]
        assert sorted(listed) == sorted([running["request_id"], just_accepted["request_id"]])
    stop_cleanly(instance)

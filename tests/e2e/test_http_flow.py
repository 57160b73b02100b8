"""The HTTP API as a client uses it: submit, follow the logs, review and apply the patch,
list, audit, rerun and cancel, against one `forgeline up`."""

from __future__ import annotations

import hashlib
import statistics
import time
import uuid
from pathlib import Path

import httpx

from tests.e2e.support import (
    all_requests,
    apply_to_clone,
    assert_error,
    events,
    get_request,
    make_repo,
    read_logs,
    sse,
    submit,
    tree_files,
    wait_request,
    wait_run,
)
from tests.helpers import wait_until

ALL_STATUSES = {"queued", "provisioning", "running", "patch_ready", "failed", "cancelled"}

ORIGINAL = {
    "README.md": "# sample\n\nA repository for Forgeline's end-to-end tests.\n",
    "greeting.txt": "hello\n",
}

EDIT_AND_ADD = """\
echo "step one: editing greeting.txt"
echo "a warning on stderr" >&2
printf 'hello, world\\n' > greeting.txt
mkdir -p docs
printf 'written by the agent\\n' > docs/notes.md
echo "done"
"""


def test_submit_follow_logs_review_and_apply_the_patch(api: httpx.Client, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    accepted = submit(api, repo, EDIT_AND_ADD, labels={"suite": "e2e"})
    request_id, run_id = accepted["request_id"], accepted["run_id"]
    assert accepted["status_url"] == f"/v1/requests/{request_id}"

    # The log stream, from the first line to `event: end`.
    stream = read_logs(api, run_id)
    assert stream[-1] == ("end", {"status": "succeeded"}), stream[-3:]
    assert all(event == "log" for event, _ in stream[:-1]), stream
    lines = [data for _, data in stream[:-1]]
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert seqs[0] == 1, "the stream starts with the first line"
    for line in lines:
        assert set(line) == {"seq", "stream", "line", "ts"}, line
        assert line["stream"] in {"stdout", "stderr", "system"}, line
    stdout = [line["line"] for line in lines if line["stream"] == "stdout"]
    assert stdout == ["step one: editing greeting.txt", "done"], lines
    assert ("stderr", "a warning on stderr") in [(x["stream"], x["line"]) for x in lines]

    # The request: patch_ready, with its one run.
    view = get_request(api, request_id)
    assert view is not None
    assert view["status"] == "patch_ready"
    assert view["id"] == request_id
    assert view["repo"] == str(repo)
    assert view["prompt"] == EDIT_AND_ADD
    assert view["agent"] == "shell"
    assert view["priority"] == 3
    assert view["labels"] == {"suite": "e2e"}
    assert view["latest_run_id"] == run_id
    assert [r["id"] for r in view["runs"]] == [run_id]
    assert view["created_at"] and view["updated_at"]

    # The run, with its patch summary.
    run = api.get(f"/v1/runs/{run_id}").json()
    assert run["request_id"] == request_id
    assert run["status"] == "succeeded"
    assert run["number"] == 1
    assert run["attempt"] == 1
    assert run["exit_code"] == 0
    assert run["error"] is None
    assert run["queued_at"] <= run["started_at"] <= run["finished_at"]

    response = api.get(f"/v1/runs/{run_id}/patch")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/x-diff")
    patch = response.text
    assert run["patch"] == {
        "files_changed": 2,
        "insertions": 2,
        "deletions": 1,
        "bytes": len(response.content),
        "sha256": hashlib.sha256(response.content).hexdigest(),
    }

    # The patch applies to a clean clone and gives exactly the expected files.
    clone = apply_to_clone(repo, patch, tmp_path / "clone")
    assert tree_files(clone) == {
        **ORIGINAL,
        "greeting.txt": "hello, world\n",
        "docs/notes.md": "written by the agent\n",
    }
    assert tree_files(repo) == ORIGINAL, "the agent must not touch the user's repository"

    # The history, straight from the event store, in commit order.
    history = events(api, request_id)
    positions = [e["position"] for e in history]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    types = [e["type"] for e in history]
    assert types[0] == "RequestSubmitted" and types[-1] == "RunSucceeded", types
    expected = ["RequestSubmitted", "RunQueued", "WorkspaceProvisioned", "RunStarted"]
    expected += ["PatchProduced", "RunSucceeded"]
    assert [t for t in types if t in expected] == expected, types
    for event in history:
        assert set(event) >= {"aggregate", "aggregate_id", "version", "timestamp", "data"}
        assert event["aggregate_id"] in {request_id, run_id}, event


def test_a_failing_script_fails_the_request_without_a_patch(
    api: httpx.Client, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    accepted = submit(api, repo, "echo 'about to fail'\nexit 3\n")
    view = wait_request(api, accepted["request_id"])
    assert view["status"] == "failed"
    run = api.get(f"/v1/runs/{accepted['run_id']}").json()
    assert run["status"] == "failed"
    assert run["exit_code"] == 3
    assert run["error"] is not None and run["error"]["code"] and run["error"]["message"]
    assert run["patch"] is None
    assert_error(api.get(f"/v1/runs/{accepted['run_id']}/patch"), 404)
    stream = read_logs(api, accepted["run_id"])
    assert stream[-1] == ("end", {"status": "failed"})
    assert "about to fail" in [data.get("line") for _, data in stream]
    types = [e["type"] for e in events(api, accepted["request_id"])]
    assert types[-1] == "RunFailed", types


def test_a_repository_that_does_not_exist_fails_with_a_reason(
    api: httpx.Client, tmp_path: Path
) -> None:
    accepted = submit(api, tmp_path / "no-such-repo", "echo hi > x.txt")
    view = wait_request(api, accepted["request_id"])
    assert view["status"] == "failed"
    run = api.get(f"/v1/runs/{accepted['run_id']}").json()
    assert run["error"] is not None, run
    assert run["error"]["code"] and run["error"]["message"], run


def test_list_requests_newest_first_with_cursor_paging(api: httpx.Client, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    batch = uuid.uuid4().hex
    ids = []
    for n in range(3):
        accepted = submit(api, repo, f"echo {n} > n.txt", labels={"batch": batch})
        wait_request(api, accepted["request_id"], ALL_STATUSES)
        ids.append(accepted["request_id"])
    newest_first = ids[::-1]

    first = api.get("/v1/requests", params={"limit": 2})
    assert first.status_code == 200
    page = first.json()
    assert [item["id"] for item in page["items"]] == newest_first[:2]
    assert page["next_cursor"]
    second = api.get("/v1/requests", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert second["items"][0]["id"] == newest_first[2]

    listed = all_requests(api)
    ours = [item["id"] for item in listed if item["labels"].get("batch") == batch]
    assert ours == newest_first
    stamps = [item["created_at"] for item in listed]
    assert stamps == sorted(stamps, reverse=True)
    assert len({item["id"] for item in listed}) == len(listed), "no request listed twice"

    for rid in ids:
        wait_request(api, rid)
    only_ready = all_requests(api, status="patch_ready")
    assert {item["status"] for item in only_ready} == {"patch_ready"}
    assert set(ids) <= {item["id"] for item in only_ready}

    assert_error(api.get("/v1/requests", params={"cursor": "not-a-cursor"}), 400)
    assert_error(api.get("/v1/requests", params={"limit": 0}), 400)
    assert_error(api.get("/v1/requests", params={"status": "nope"}), 400)


def test_rerun_with_a_follow_up_prompt_gives_a_cumulative_patch(
    api: httpx.Client, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    accepted = submit(api, repo, "printf 'hello, world\\n' > greeting.txt")
    request_id, first_run = accepted["request_id"], accepted["run_id"]
    assert wait_request(api, request_id)["status"] == "patch_ready"

    follow_up = "echo 'follow-up'\nprintf 'second step\\n' > step2.txt\n"
    response = api.post(f"/v1/requests/{request_id}/rerun", json={"prompt": follow_up})
    assert response.status_code == 202, response.text
    rerun = response.json()
    assert rerun["request_id"] == request_id
    second_run = rerun["run_id"]
    assert second_run != first_run

    run = wait_run(api, second_run)
    assert run["status"] == "succeeded", run
    assert run["number"] == 2
    view = wait_request(api, request_id)
    assert view["status"] == "patch_ready"
    assert view["latest_run_id"] == second_run
    assert [r["id"] for r in view["runs"]] == [first_run, second_run]

    stream = read_logs(api, second_run)
    assert "follow-up" in [data.get("line") for _, data in stream]

    patch = api.get(f"/v1/runs/{second_run}/patch").text
    clone = apply_to_clone(repo, patch, tmp_path / "clone")
    assert tree_files(clone) == {
        **ORIGINAL,
        "greeting.txt": "hello, world\n",
        "step2.txt": "second step\n",
    }
    # The first run's patch is still its own.
    first_patch = api.get(f"/v1/runs/{first_run}/patch").text
    assert "step2.txt" not in first_patch and "greeting.txt" in first_patch

    types = [e["type"] for e in events(api, request_id)]
    assert "RerunRequested" in types
    assert types.count("RunSucceeded") == 2
    assert types[-1] == "RunSucceeded"

    # A rerun without a prompt repeats the last one on top of the latest patch.
    response = api.post(f"/v1/requests/{request_id}/rerun")
    assert response.status_code == 202, response.text
    third = wait_run(api, response.json()["run_id"])
    assert third["status"] == "succeeded" and third["number"] == 3


def _sleep_processes(marker: str) -> list[int]:
    """Pids of live `sleep <marker>` processes."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", marker.encode()]:
            pids.append(int(proc.name))
    return pids


def test_rerun_while_active_conflicts_and_cancel_stops_the_agent(
    api: httpx.Client, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    marker = f"60.{uuid.uuid4().int % 10**6:06d}"
    accepted = submit(api, repo, f"echo 'going to sleep'\nsleep {marker}\necho never\n")
    request_id, run_id = accepted["request_id"], accepted["run_id"]
    wait_run(api, run_id, {"running"})
    wait_until(lambda: _sleep_processes(marker), 10, "the agent's sleep to start")

    assert_error(api.post(f"/v1/requests/{request_id}/rerun", json={}), 409)

    response = api.post(f"/v1/requests/{request_id}/cancel")
    assert response.status_code == 202, response.text
    assert response.json() == {"request_id": request_id, "run_id": run_id}
    started = time.monotonic()
    run = wait_run(api, run_id, timeout=5)
    assert run["status"] == "cancelled", run
    assert time.monotonic() - started < 5
    assert wait_request(api, request_id, timeout=5)["status"] == "cancelled"
    wait_until(lambda: not _sleep_processes(marker), 5, "the agent to be stopped")

    stream = read_logs(api, run_id)
    assert stream[-1] == ("end", {"status": "cancelled"})
    lines = [data.get("line") for _, data in stream]
    assert "going to sleep" in lines and "never" not in lines
    types = [e["type"] for e in events(api, request_id)]
    assert "CancelRequested" in types and types[-1] == "RunCancelled", types

    # Nothing active any more: cancel conflicts, a rerun is allowed again.
    assert_error(api.post(f"/v1/requests/{request_id}/cancel"), 409)


def test_cancel_when_nothing_is_active_conflicts(api: httpx.Client, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    accepted = submit(api, repo, "echo quick > q.txt")
    wait_request(api, accepted["request_id"])
    before = len(events(api, accepted["request_id"]))
    assert_error(api.post(f"/v1/requests/{accepted['request_id']}/cancel"), 409)
    assert len(events(api, accepted["request_id"])) == before


def test_health_readiness_and_metrics(api: httpx.Client) -> None:
    assert api.get("/healthz").status_code == 200
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"nats": True, "postgres": True}
    metrics = api.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'forgeline_requests{status="patch_ready"}' in metrics.text


def test_post_to_patch_ready_latency(api: httpx.Client, tmp_path: Path) -> None:
    """A trivial shell request, ten times in a row: the median POST -> patch_ready time."""
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    durations = []
    for n in range(10):
        started = time.monotonic()
        accepted = submit(api, repo, f"echo {n} > n.txt")
        wait_request(api, accepted["request_id"], {"patch_ready"}, interval=0.01)
        durations.append(time.monotonic() - started)
    median = statistics.median(durations)
    print(
        f"\nPOST -> patch_ready: median {median * 1000:.0f} ms, max {max(durations) * 1000:.0f} ms"
    )
    assert median < 5.0, durations


def test_logs_arrive_live_while_the_run_is_going(api: httpx.Client, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    accepted = submit(api, repo, "echo early\nsleep 2\necho late\n")
    run_id = accepted["run_id"]
    wait_until(lambda: api.get(f"/v1/runs/{run_id}").status_code == 200, 30, "the run")
    arrivals: dict[str, float] = {}
    ended = None
    for event, data in sse(api, run_id):
        if event == "log":
            arrivals.setdefault(data["line"], time.monotonic())
        elif event == "end":
            ended = data
            break
    assert ended == {"status": "succeeded"}
    assert arrivals["late"] - arrivals["early"] > 1.0, "`early` came while the script slept"


def test_a_script_over_its_timeout_is_stopped_and_fails(api: httpx.Client, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    started = time.monotonic()
    accepted = submit(api, repo, "echo slow\nsleep 30\n", timeout_s=1)
    view = wait_request(api, accepted["request_id"], timeout=20)
    assert time.monotonic() - started < 15
    assert view["status"] == "failed"
    run = api.get(f"/v1/runs/{accepted['run_id']}").json()
    assert run["error"] is not None and "time" in run["error"]["code"], run


def test_many_requests_at_once_all_complete(api: httpx.Client, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    accepted = [submit(api, repo, f"sleep 0.3\necho {n} > n{n}.txt") for n in range(10)]
    for n, item in enumerate(accepted):
        view = wait_request(api, item["request_id"], timeout=60)
        assert view["status"] == "patch_ready", view
        patch = api.get(f"/v1/runs/{item['run_id']}/patch").text
        assert f"+++ b/n{n}.txt" in patch and patch.count("diff --git") == 1


def test_a_chatty_script_keeps_every_line(api: httpx.Client, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", ORIGINAL)
    accepted = submit(api, repo, "seq 1 20000\n")
    wait_request(api, accepted["request_id"], timeout=60)
    stream = read_logs(api, accepted["run_id"], timeout=120)
    stdout = [data["line"] for event, data in stream if data.get("stream") == "stdout"]
    assert len(stdout) == 20000 and stdout[-1] == "20000", (len(stdout), stdout[-1:])

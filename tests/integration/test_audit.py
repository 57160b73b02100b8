"""`forgeline audit` (and the examples of docs/audit.md) on a scripted story with a fixed clock.

The story: a request whose first run loses its worker (requeued), fails on its second attempt,
is rerun with a follow-up prompt that succeeds; a second request is cancelled while queued.
Ids, command ids and timestamps are fixed, so every output is exact: the timeline must match
the expected one line by line, and docs/audit.md's examples must print what the doc says.

Set FORGELINE_REGENERATE_DOCS=1 to rewrite the outputs in docs/audit.md from a run instead.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import eventsourcing.domain
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from domain.application import Forgeline
from domain.commands import RequestSpec
from domain.request import Request
from domain.status import FailureCode
from forgeline import cli
from forgeline.bootstrap import open_store
from forgeline.embedded import start_postgres
from forgeline.store_integrity import ensure_store_integrity
from projections.audit import request_history

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"

REQUEST = UUID("5f0c4b1e-8d2a-4c1b-9e3f-2a7d6c5b4a39")
RUN_1 = UUID("a1e2c3d4-0001-4b5c-8d9e-0f1a2b3c4d5e")
RUN_2 = UUID("a1e2c3d4-0002-4b5c-8d9e-0f1a2b3c4d5e")
OTHER = UUID("9c8b7a6f-5e4d-4c3b-8a29-180f7e6d5c4b")
OTHER_RUN = UUID("b2c3d4e5-0001-4f6a-9b8c-7d6e5f4a3b2c")
BASE = "3f2a9c1e7b6d5a4f3e2d1c0b9a8f7e6d5c4b3a29"
DIFF_1 = (
    "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n"
    "@@ -1 +1 @@\n-Helo, Wrold\n+Hello, Wrold\n"
)
DIFF_2 = (
    "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n"
    "@@ -1 +1 @@\n-Helo, Wrold\n+Hello, World\n"
)
LOG = hashlib.sha256(b"story log").hexdigest()


def stats(diff: str) -> dict[str, Any]:
    return {
        "sha256": hashlib.sha256(diff.encode()).hexdigest(),
        "bytes": len(diff.encode()),
        "files_changed": 1,
        "insertions": 1,
        "deletions": 1,
    }


class Clock:
    """eventsourcing's clock, under the test's control: each event a millisecond after the
    previous one, and `advance` for the time work takes."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


START = datetime(2025, 3, 1, 9, 0, 0, tzinfo=UTC)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fixed = Clock(START - timedelta(milliseconds=1))
    monkeypatch.setattr(eventsourcing.domain, "datetime_now_with_tzinfo", fixed)
    return fixed


@dataclass
class StoryStore:
    app: Forgeline
    url: str


def play_story(app: Forgeline, clock: Clock) -> None:
    """The story of the module docstring, written as the handlers and the executor write it."""
    request, run = Request.submit(
        request_id=REQUEST,
        run_id=RUN_1,
        spec=RequestSpec(
            repo="/srv/repos/shop",
            ref="main",
            prompt="sed -i 's/Helo/Hello/' README.md",
            priority=2,
            timeout_s=600,
            labels={"team": "web"},
        ),
        command_id="cmd-0001",
        idempotency_key="fix-typo-1",
        submitted_by="key-ops-alice",
    )
    app.save(request, run)

    clock.advance(0.4)
    run = app.get_run(RUN_1)
    run.start_provisioning("worker-a")
    app.save(run)
    clock.advance(1.2)
    run.record_workspace("docker", BASE)
    run.start()
    app.save(run)
    clock.advance(20)
    run.requeue("worker_lost")  # worker-a stopped heartbeating
    app.save(run)

    clock.advance(0.5)
    run = app.get_run(RUN_1)
    run.start_provisioning("worker-b")
    app.save(run)
    clock.advance(1.1)
    run.record_workspace("docker", BASE)
    run.start()
    app.save(run)
    clock.advance(8)
    run.record_patch(DIFF_1, stats(DIFF_1))
    message = "agent exited with code 1"
    run.fail(FailureCode.AGENT_FAILED, message, exit_code=1, log_lines=12, log_sha256=LOG)
    app.save(run)

    clock.advance(60)
    request = app.get_request(REQUEST)
    run_2 = request.rerun(
        run_id=RUN_2,
        prompt="sed -i 's/Wrold/World/' README.md",
        command_id="cmd-0002",
        latest=app.get_run(RUN_1),
        requested_by="key-ops-alice",
    )
    app.save(request, run_2)
    clock.advance(0.3)
    run_2.start_provisioning("worker-b")
    app.save(run_2)
    clock.advance(1.0)
    run_2.record_workspace("docker", BASE)
    run_2.start()
    app.save(run_2)
    clock.advance(5)
    run_2.record_patch(DIFF_2, stats(DIFF_2))
    run_2.succeed(0, log_lines=7, log_sha256=LOG)
    app.save(run_2)

    clock.advance(30)
    other, other_run = Request.submit(
        request_id=OTHER,
        run_id=OTHER_RUN,
        spec=RequestSpec(repo="/srv/repos/shop", prompt="make lint"),
        command_id="cmd-0003",
    )
    app.save(other, other_run)
    clock.advance(2)
    other_run.request_cancel("cancelled by client", "cmd-0004", requested_by="key-ci-bot")
    app.save(other_run)


@pytest.fixture
def story(database_url: str, clock: Clock) -> Iterator[StoryStore]:
    app = open_store(database_url)
    ensure_store_integrity(database_url)  # idempotent: also when open_store installs it
    play_story(app, clock)
    yield StoryStore(app, database_url)
    app.close()


def forgeline(url: str, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Runs the `forgeline` command in this process against the store at url."""
    env = {"FORGELINE_DATABASE_URL": url, "FORGELINE_CIPHER_KEY": "", **(env or {})}
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    for key in [k for k, v in env.items() if not v]:
        del os.environ[key]
    buffer = io.StringIO()
    try:
        with redirect_stdout(buffer):
            code = cli.main(list(argv))
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return code, buffer.getvalue()


EXPECTED_TIMELINE = [
    # position, run, type, from, to
    (1, None, "RequestSubmitted", None, "queued"),
    (2, 1, "RunQueued", None, "queued"),
    (3, 1, "ProvisioningStarted", "queued", "provisioning"),
    (4, 1, "WorkspaceProvisioned", "provisioning", "provisioning"),
    (5, 1, "RunStarted", "provisioning", "running"),
    (6, 1, "RunRequeued", "running", "queued"),
    (7, 1, "ProvisioningStarted", "queued", "provisioning"),
    (8, 1, "WorkspaceProvisioned", "provisioning", "provisioning"),
    (9, 1, "RunStarted", "provisioning", "running"),
    (10, 1, "PatchProduced", "running", "running"),
    (11, 1, "RunFailed", "running", "failed"),
    (12, None, "RerunRequested", "failed", "queued"),
    (13, 2, "RunQueued", None, "queued"),
    (14, 2, "ProvisioningStarted", "queued", "provisioning"),
    (15, 2, "WorkspaceProvisioned", "provisioning", "provisioning"),
    (16, 2, "RunStarted", "provisioning", "running"),
    (17, 2, "PatchProduced", "running", "running"),
    (18, 2, "RunSucceeded", "running", "succeeded"),
]

EXPECTED_WHAT = [
    "request submitted: agent shell, repo /srv/repos/shop @ main, priority 2, timeout 600s,"
    " labels team=web, idempotency key fix-typo-1 (by key-ops-alice, command cmd-0001)",
    "run #1 queued (agent shell, timeout 600s)",
    "attempt 1 claimed by worker worker-a",
    "workspace ready (docker), base commit 3f2a9c1e7b6d",
    "agent started",
    "requeued: worker_lost",
    "attempt 2 claimed by worker worker-b",
    "workspace ready (docker), base commit 3f2a9c1e7b6d",
    "agent started",
    f"patch: 1 file(s), +1 -1, {len(DIFF_1)} bytes, sha256 {stats(DIFF_1)['sha256']}",
    f"failed: agent_failed: agent exited with code 1; log 12 lines, sha256 {LOG[:12]}",
    f"rerun asked, with a follow-up prompt: run {RUN_2} (by key-ops-alice, command cmd-0002)",
    f"run #2 queued (agent shell, timeout 600s), on top of the patch of run {RUN_1}",
    "attempt 1 claimed by worker worker-b",
    "workspace ready (docker), base commit 3f2a9c1e7b6d",
    "agent started",
    f"patch: 1 file(s), +1 -1, {len(DIFF_2)} bytes, sha256 {stats(DIFF_2)['sha256']}",
    f"succeeded, exit code 0; log 7 lines, sha256 {LOG[:12]}",
]


def test_audit_json_tells_the_whole_story(story: StoryStore) -> None:
    code, out = forgeline(story.url, "audit", str(REQUEST), "--json")
    assert code == 0
    report = json.loads(out)
    timeline = [
        (e["position"], e["run_number"], e["type"], e["status_from"], e["status_to"])
        for e in report["timeline"]
    ]
    assert timeline == EXPECTED_TIMELINE
    assert [e["summary"] for e in report["timeline"]] == EXPECTED_WHAT
    # Every event keeps its full data: the diff, the command ids, the workers.
    assert report["timeline"][9]["data"]["diff"] == DIFF_1
    assert report["timeline"][0]["timestamp"] == "2025-03-01T09:00:00+00:00"

    req = report["request"]
    assert req["status"] == "patch_ready"
    assert req["command_id"] == "cmd-0001"
    assert req["submitted_by"] == "key-ops-alice"
    assert req["idempotency_key"] == "fix-typo-1"
    assert req["labels"] == {"team": "web"}
    assert req["latest_run_id"] == str(RUN_2)

    run_1, run_2 = report["runs"]
    assert [(a["attempt"], a["worker"], a["outcome"]) for a in run_1["attempts"]] == [
        (1, "worker-a", "requeued: worker_lost"),
        (2, "worker-b", "failed"),
    ]
    assert run_1["error"] == {"code": "agent_failed", "message": "agent exited with code 1"}
    assert run_1["patch"]["sha256"] == stats(DIFF_1)["sha256"]
    assert run_1["patch"]["position"] == 10
    assert run_1["log"] == {"lines": 12, "sha256": LOG}
    assert run_2["prompt"] == "sed -i 's/Wrold/World/' README.md"
    assert run_2["base_run_id"] == str(RUN_1)
    assert run_2["status"] == "succeeded" and run_2["exit_code"] == 0
    assert run_2["patch"]["sha256"] == stats(DIFF_2)["sha256"]
    assert run_2["attempts"][0]["base_commit"] == BASE
    assert run_2["usage"] is None


def test_audit_text_shows_the_timeline_in_order(story: StoryStore) -> None:
    code, out = forgeline(story.url, "audit", str(REQUEST))
    assert code == 0
    assert out.startswith(f"request {REQUEST}  patch_ready\n")
    rows = [line for line in out.splitlines() if re.match(r"^│ \d+ +│ 2025-", line)]
    assert len(rows) == len(EXPECTED_TIMELINE)
    for row, (position, run, type_, before, after), what in zip(
        rows, EXPECTED_TIMELINE, EXPECTED_WHAT, strict=True
    ):
        cells = [cell.strip() for cell in row.strip("│").split("│")]
        assert cells[0] == str(position)
        assert cells[2] == (f"#{run}" if run else "request")
        assert cells[3] == type_
        assert cells[4] == ("" if before == after else f"{before} -> {after}" if before else after)
        assert cells[5] == what
    assert "2025-03-01 09:00:00.000Z" in rows[0]


def test_audit_of_the_api_and_of_the_cli_agree(story: StoryStore) -> None:
    """GET /v1/requests/{id}/events and the audit report list the same events."""
    import asyncio

    async def api_history() -> list[dict[str, Any]] | None:
        async with AsyncConnectionPool(story.url, min_size=1, open=False) as pool:
            return await request_history(story.app, pool, REQUEST)

    history = asyncio.run(api_history())
    assert history is not None
    _, out = forgeline(story.url, "audit", str(REQUEST), "--json")
    timeline = json.loads(out)["timeline"]
    keys = ("position", "aggregate", "aggregate_id", "version", "type", "timestamp", "data")
    assert [{k: e[k] for k in keys} for e in timeline] == history


def test_audit_of_an_unknown_or_malformed_request(story: StoryStore) -> None:
    code, out = forgeline(story.url, "audit", str(RUN_1))  # a run's id is not a request's
    assert code == 1 and out == ""
    code, out = forgeline(story.url, "audit", "not-a-uuid")
    assert code == 2 and out == ""


def test_the_tools_read_an_encrypted_store_given_its_key(database_url: str, clock: Clock) -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    app = open_store(database_url, SecretStr(key))
    ensure_store_integrity(database_url)
    play_story(app, clock)
    app.close()
    with psycopg.connect(database_url) as conn:
        state = conn.execute("SELECT state FROM forgeline_events LIMIT 1").fetchone()
    assert state is not None and b"sed -i" not in bytes(state[0])  # encrypted at rest

    with_key = {"FORGELINE_CIPHER_KEY": key}
    code, out = forgeline(database_url, "audit", str(REQUEST), "--json", env=with_key)
    assert code == 0
    assert [e["summary"] for e in json.loads(out)["timeline"]] == EXPECTED_WHAT
    code, out = forgeline(database_url, "replay", "--position", "11", "--json", env=with_key)
    assert code == 0 and json.loads(out)["requests"][0]["status"] == "failed"
    assert forgeline(database_url, "projections", "rebuild", env=with_key)[0] == 0
    assert forgeline(database_url, "verify")[0] == 0  # hashes are over the stored bytes
    # Without the key: a plain error, not a traceback.
    assert forgeline(database_url, "audit", str(REQUEST)) == (2, "")


def test_the_tools_reach_the_embedded_postgres_of_the_data_dir(clock: Clock) -> None:
    """Without FORGELINE_DATABASE_URL: the data dir's Postgres, reused when it runs (and left
    running), else started for the command and stopped after it."""
    data_dir = Path(tempfile.mkdtemp(prefix="fl-dd-", dir="/tmp"))
    data_dir.chmod(0o711)
    no_url = {"FORGELINE_DATABASE_URL": "", "FORGELINE_DATA_DIR": str(data_dir)}
    pg = None
    try:
        assert forgeline("", "verify", env=no_url) == (2, "")  # no store there: nothing made
        assert not (data_dir / "postgres").exists()

        pg = start_postgres(data_dir / "postgres")  # as `forgeline up` starts it
        app = open_store(pg.url("forgeline"))
        ensure_store_integrity(pg.url("forgeline"))
        play_story(app, clock)
        app.close()
        code, out = forgeline("", "audit", str(REQUEST), "--json", env=no_url)
        assert code == 0 and json.loads(out)["request"]["status"] == "patch_ready"
        assert pg.is_ready(), "a server someone else started is left running"

        pg.stop()
        code, out = forgeline("", "verify", "--data-dir", str(data_dir), env=no_url)
        assert code == 0 and out.startswith("ok: 22 events verified")
        assert not pg.is_ready(), "a server the command started is stopped again"
        assert not (pg.pgdata / "postmaster.pid").exists()
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# ------------------------------------------------------------------------ docs/audit.md


@dataclass
class Example:
    kind: str  # "console" (commands and output), "sql" (run), "sql-refused" (must fail)
    start: int  # line index of the block's first content line
    end: int  # line index of the closing fence
    lines: list[str]


def doc_examples(text: str) -> list[Example]:
    lines = text.splitlines()
    examples, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(console|sql|sql-refused)\s*$", lines[i])
        if fence:
            j = i + 1
            while lines[j] != "```":
                j += 1
            examples.append(Example(fence.group(1), i + 1, j, lines[i + 1 : j]))
            i = j
        i += 1
    return examples


_VARYING = [
    # durations and rates of the rebuild
    (re.compile(r"\d[\d,]*(\.\d+)? (s|ms|events/s)\b"), r"<n> \2"),
    # hashes over stored bytes change whenever an event's encoding does (a new field, say)
    (re.compile(r"\b[0-9a-f]{64}\b"), "<sha256>"),
]


def normalised(text: str) -> str:
    for pattern, replacement in _VARYING:
        text = pattern.sub(replacement, text)
    return text


def run_console(url: str, commands: list[str]) -> list[str]:
    """Runs `$ ...` lines (forgeline with an optional `| head -n N`, or `echo $?`); returns the
    block as it must read: each command followed by its output."""
    block: list[str] = []
    last_code = 0
    for command in commands:
        block.append(f"$ {command}")
        if command == "echo $?":
            block.append(str(last_code))
            continue
        pipeline = [part.strip() for part in command.split("|")]
        argv = shlex.split(pipeline[0])
        assert argv[0] == "forgeline", command
        last_code, out = forgeline(url, *argv[1:])
        lines = out.splitlines()
        for stage in pipeline[1:]:
            head = re.fullmatch(r"head -n (\d+)", stage)
            assert head, f"unsupported pipe stage {stage!r}"
            lines = lines[: int(head.group(1))]
        block.extend(lines)
    return block


def test_the_examples_of_docs_audit_md(story: StoryStore) -> None:
    text = DOC.read_text()
    lines = text.splitlines()
    examples = doc_examples(text)
    assert examples, "docs/audit.md has no examples"
    regenerated = list(lines)
    offset = 0
    for example in examples:
        if example.kind == "sql":
            with psycopg.connect(story.url, autocommit=True) as conn:
                conn.execute("\n".join(example.lines).encode())
            continue
        if example.kind == "sql-refused":
            statement = "\n".join(x for x in example.lines if not x.startswith("--"))
            expected = [x for x in example.lines if x.startswith("-- ERROR:  ")]
            assert len(expected) == 1, "a sql-refused example names its error"
            with (
                psycopg.connect(story.url, autocommit=True) as conn,
                pytest.raises(psycopg.Error) as refused,
            ):
                conn.execute(statement.encode())
            assert refused.value.diag.message_primary == expected[0].removeprefix("-- ERROR:  ")
            continue
        commands = [line[2:] for line in example.lines if line.startswith("$ ")]
        actual = run_console(story.url, commands)
        if os.environ.get("FORGELINE_REGENERATE_DOCS"):
            regenerated[example.start + offset : example.end + offset] = actual
            offset += len(actual) - (example.end - example.start)
            continue
        assert normalised("\n".join(actual)) == normalised("\n".join(example.lines)), (
            f"docs/audit.md line {example.start + 1}: the example prints something else;"
            " FORGELINE_REGENERATE_DOCS=1 rewrites it"
        )
    if os.environ.get("FORGELINE_REGENERATE_DOCS"):
        DOC.write_text("\n".join(regenerated) + "\n")

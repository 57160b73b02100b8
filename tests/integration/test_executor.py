"""The worker, relay and projector (forgeline.bootstrap.run_services) running shell requests
against real git repositories, NATS and Postgres, seen as a user sees them: statuses, failure
codes, patches that apply, logs in order, agents that stop.

One set of services serves the whole module (starting them per test would cost a second or
two each); every test works on requests and a repository of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from broker import subjects
from broker.commands import AnyCommand, publish_command
from broker.connection import connect
from broker.logs import ACK_TIMEOUT_S, read_log
from domain.application import Forgeline
from domain.commands import CancelRequest, RerunRequest
from domain.run import Run
from domain.status import RunStatus
from forgeline.bootstrap import Servers, open_store, run_services
from forgeline.embedded import EmbeddedPostgres, start_nats
from forgeline.settings import Settings
from handlers.agents.base import BASE_ENV
from projections.views import Views
from tests.integration.conftest import eventually, in_thread
from tests.integration.worker_stack import finished, run_now, submit


@dataclass
class Stack:
    js: JetStreamContext
    app: Forgeline
    views: Views
    task: asyncio.Task[None]
    workspaces: Path

    def check_alive(self) -> None:
        if self.task.done():
            raise RuntimeError(f"the services stopped: {self.task.exception()!r}")


@pytest.fixture(scope="module")
def module_database(pg_server: EmbeddedPostgres) -> Iterator[str]:
    name = f"exec_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start_nats(tmp_path_factory.mktemp("executor-nats"))
    yield server.url
    server.stop()


@asynccontextmanager
async def running_stack(nats_url: str, database_url: str, data_dir: Path) -> AsyncIterator[Stack]:
    """A worker, the relay and the projector in this process, as `forgeline worker` etc. run."""
    settings = Settings(
        data_dir=data_dir,
        nats_url=nats_url,
        database_url=database_url,
        provisioner="local",  # Docker workspaces have tests of their own
        worker_name="itest-worker",
        worker_slots=8,
        shutdown_grace_s=5,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_services(
            settings,
            Servers(nats_url=nats_url, database_url=database_url),
            stop,
            roles=frozenset({"worker", "relay", "projector"}),
        )
    )
    nc: Client = await connect(nats_url, name="executor-tests")
    app = await in_thread(open_store, database_url)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(database_url, min_size=1, open=False)
    await pool.open()
    try:
        # The services declare the streams; commands can be published once they exist.
        js = nc.jetstream()
        await eventually(lambda: js.stream_info(subjects.COMMANDS_STREAM), message="streams")
        yield Stack(js, app, Views(pool), task, settings.workspaces_dir)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await pool.close()
        app.close()
        await nc.close()


@pytest.fixture(scope="module")
async def stack(
    module_nats: str, module_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    data_dir = tmp_path_factory.mktemp("executor-data")
    async with running_stack(module_nats, module_database, data_dir) as services:
        yield services


# -- helpers ----------------------------------------------------------------------------------


async def send(stack: Stack, command: AnyCommand) -> None:
    stack.check_alive()
    await publish_command(stack.js, command)


async def reaches(stack: Stack, run_id: UUID, status: RunStatus, timeout: float = 20) -> Run:
    async def there() -> Run | None:
        run = await run_now(stack, run_id)
        assert not run.is_terminal or status is run.status, f"run ended {run.status}"
        return run if run.status is status else None

    run: Run = await eventually(there, timeout, f"run {run_id} to be {status}")
    return run


async def released(stack: Stack, run_id: UUID) -> None:
    """The run's workspace is removed (just after its terminal event is recorded): nothing
    named after the run is left, not even the folder it was moved to for removal."""

    def gone() -> bool:
        return not any(str(run_id) in entry.name for entry in stack.workspaces.iterdir())

    await eventually(gone, timeout=5, message=f"workspace of {run_id} removed")


def git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=repo, input=stdin, capture_output=True, check=False)
    assert done.returncode == 0, f"git {args[0]} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout.decode()


def clean_clone(repo: Path, commit: str, into: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(repo), str(into)], check=True)
    git(into, "checkout", "--quiet", "--detach", commit)
    return into


def tree(root: Path) -> dict[str, tuple[bytes, bool]]:
    """Every file under root outside .git: its bytes and whether it is executable."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == ".git" or not path.is_file():
            continue
        files[str(rel)] = (path.read_bytes(), os.access(path, os.X_OK))
    return files


def run_script_by_hand(repo: Path, commit: str, script: str, into: Path) -> Path:
    """What the script does to a checkout of the commit when run directly, for comparison."""
    clean_clone(repo, commit, into)
    script_path = into.parent / f"{into.name}.sh"
    script_path.write_text(script)
    subprocess.run(["bash", str(script_path)], cwd=into, env=dict(BASE_ENV), check=False)
    return into


def processes(argv: list[str]) -> dict[int, int]:
    """Live (non-zombie) processes with exactly this argv: pid -> parent pid."""
    wanted = [part.encode() for part in argv]
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if cmdline == wanted and fields[0] != "Z":
            found[int(entry.name)] = int(fields[1])
    return found


def parent_of(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def our_agent_process(argv: list[str]) -> int | None:
    """The pid of a process with this argv started by an agent of this test process (its
    parent is the agent's bash, whose parent is us): other suites may run on this machine."""
    for pid, ppid in processes(argv).items():
        if parent_of(ppid) == os.getpid():
            return pid
    return None


def is_gone(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


# -- patches ----------------------------------------------------------------------------------

EDIT_SCRIPT = r"""
set -e
echo "editing the repository"
# a tracked file edited
sed -i 's/return "hello"/return "hello, world"/' src/hello.py
printf 'def bye() -> str:\n    return "bye"\n' >> src/hello.py
# an untracked text file, one with a space in its name, one without a final newline
mkdir -p docs
printf 'Notes\n=====\n\nWritten by an agent.\n' > docs/notes.md
printf 'spaced out\n' > "docs/with space.txt"
printf 'no newline at the end' > docs/tail.txt
# a binary file with every byte value, NUL and 0xff included
for i in $(seq 0 255); do printf "\\x$(printf %02x "$i")"; done > docs/blob.bin
# an empty file, an executable script, a tracked file removed
: > docs/empty
printf '#!/bin/sh\necho run\n' > run.sh && chmod +x run.sh
git rm --quiet README.md
echo "done" >&2
"""


async def test_shell_patch_applies_to_a_clean_clone_of_the_base_commit_byte_for_byte(
    stack: Stack, git_repo: Path, tmp_path: Path
) -> None:
    head = git(git_repo, "rev-parse", "HEAD").strip()
    command = await submit(stack, git_repo, EDIT_SCRIPT, ref="main")
    run = await finished(stack, command.run_id)

    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.exit_code == 0
    assert run.base_commit == head
    assert [type(e).__name__ for e in await in_thread(stored_events, stack.app, run.id)] == [
        "RunQueued",
        "ProvisioningStarted",
        "WorkspaceProvisioned",
        "RunStarted",
        "PatchProduced",
        "RunSucceeded",
    ]
    assert run.patch is not None
    applied = clean_clone(git_repo, head, tmp_path / "applied")
    git(applied, "apply", stdin=run.patch.encode())
    expected = run_script_by_hand(git_repo, head, EDIT_SCRIPT, tmp_path / "by-hand")
    assert tree(applied) == tree(expected)
    assert tree(applied)["docs/blob.bin"][0] == bytes(range(256))
    assert "README.md" not in tree(applied)
    assert tree(applied)["run.sh"][1], "the executable bit was lost"

    # What a reader of the API sees: patch_ready, the patch summary, the same diff.
    async def projected() -> dict[str, Any] | None:
        view = await stack.views.get_request(command.request_id)
        return view if view and view["status"] == "patch_ready" else None

    view = await eventually(projected, message="the request to show patch_ready")
    summary = view["runs"][0]["patch"]
    assert summary["sha256"] == hashlib.sha256(run.patch.encode()).hexdigest()
    assert summary["files_changed"] == 8
    assert summary["bytes"] == len(run.patch.encode())
    assert await stack.views.get_run_diff(command.run_id) == run.patch
    await released(stack, command.run_id)


async def test_non_utf8_text_file_comes_back_with_its_own_bytes(
    stack: Stack, git_repo: Path, tmp_path: Path
) -> None:
    script = r"printf 'caf\xe9 cr\xe8me\n' > latin1.txt"
    command = await submit(stack, git_repo, script)
    run = await finished(stack, command.run_id)
    assert run.status is RunStatus.SUCCEEDED and run.patch is not None
    applied = clean_clone(git_repo, run.base_commit or "", tmp_path / "applied")
    git(applied, "apply", stdin=run.patch.encode())
    assert (applied / "latin1.txt").read_bytes() == b"caf\xe9 cr\xe8me\n"


async def test_text_file_with_a_late_nul_byte_comes_back_with_its_own_bytes(
    stack: Stack, git_repo: Path, tmp_path: Path
) -> None:
    """git diffs a file whose NUL byte lies past its first 8000 bytes as text; Postgres text
    cannot hold U+0000, so such a file is diffed as binary and projects intact."""
    script = "python3 -c \"open('late.txt', 'wb').write(b'a\\n' * 5000 + b'x\\0y\\n')\""
    command = await submit(stack, git_repo, script)
    run = await finished(stack, command.run_id)
    assert run.status is RunStatus.SUCCEEDED and run.patch is not None
    assert "\x00" not in run.patch
    applied = clean_clone(git_repo, run.base_commit or "", tmp_path / "applied")
    git(applied, "apply", stdin=run.patch.encode())
    assert (applied / "late.txt").read_bytes() == b"a\n" * 5000 + b"x\0y\n"

    async def projected() -> str | None:
        return await stack.views.get_run_diff(command.run_id)

    assert await eventually(projected, message="the diff to be projected") == run.patch


async def test_script_changing_nothing_succeeds_without_a_patch(
    stack: Stack, git_repo: Path
) -> None:
    command = await submit(stack, git_repo, "echo looking around; ls > /dev/null")
    run = await finished(stack, command.run_id)
    assert (run.status, run.exit_code, run.patch) == (RunStatus.SUCCEEDED, 0, None)


async def test_exit_3_fails_agent_failed_and_keeps_the_patch(
    stack: Stack, git_repo: Path, tmp_path: Path
) -> None:
    script = "echo 'half done' > partial.txt\necho 'giving up' >&2\nexit 3\n"
    command = await submit(stack, git_repo, script)
    run = await finished(stack, command.run_id)

    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error["code"] == "agent_failed"
    assert run.exit_code == 3
    assert run.patch is not None
    applied = clean_clone(git_repo, run.base_commit or "", tmp_path / "applied")
    git(applied, "apply", stdin=run.patch.encode())
    assert (applied / "partial.txt").read_text() == "half done\n"


async def test_timeout_fails_the_run_within_seconds_and_kills_the_agent(
    stack: Stack, git_repo: Path
) -> None:
    started = time.monotonic()
    command = await submit(stack, git_repo, "echo start\nsleep 30\n", timeout_s=1)
    sleeper = await eventually(
        lambda: our_agent_process(["sleep", "30"]), message="the agent's sleep", interval=0.01
    )
    run = await finished(stack, command.run_id, timeout=10)
    elapsed = time.monotonic() - started

    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error["code"] == "timeout"
    assert elapsed < 6, f"the timeout took {elapsed:.1f} s to take effect"
    await eventually(lambda: is_gone(sleeper), timeout=3, message="the sleep to be killed")


@pytest.mark.parametrize(
    ("where", "ref"),
    [
        pytest.param("/nonexistent", None, id="no-such-repo"),
        pytest.param("file:///nonexistent/repo.git", None, id="no-such-file-url"),
        pytest.param("git_repo", "no-such-branch", id="no-such-ref"),
        pytest.param("git_repo", "0123456789abcdef0123456789abcdef01234567", id="no-such-sha"),
    ],
)
async def test_unreachable_repo_or_ref_fails_repo_unreachable(
    stack: Stack, git_repo: Path, where: str, ref: str | None
) -> None:
    repo = git_repo if where == "git_repo" else where
    command = await submit(stack, repo, "echo never runs > ran.txt", ref=ref)
    run = await finished(stack, command.run_id)

    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error["code"] == "repo_unreachable", run.error
    assert run.started_at is None and run.patch is None
    await released(stack, command.run_id)


async def test_cancel_of_a_running_agent_stops_it_within_5_s(stack: Stack, git_repo: Path) -> None:
    command = await submit(stack, git_repo, "echo waiting\nsleep 60\n")
    await reaches(stack, command.run_id, RunStatus.RUNNING)
    sleeper = await eventually(
        lambda: our_agent_process(["sleep", "60"]), message="the agent's sleep 60"
    )

    asked = time.monotonic()
    await send(
        stack, CancelRequest(command_id=f"cmd-{uuid.uuid4()}", request_id=command.request_id)
    )
    run = await finished(stack, command.run_id, timeout=10)
    took = time.monotonic() - asked

    assert run.status is RunStatus.CANCELLED
    assert took < 5, f"the cancel took {took:.1f} s"
    await eventually(lambda: is_gone(sleeper), timeout=3, message="the sleep 60 to be killed")
    await released(stack, command.run_id)

    async def projected() -> bool:
        view = await stack.views.get_request(command.request_id)
        return view is not None and view["status"] == "cancelled"

    await eventually(projected, message="the request to show cancelled")


async def test_rerun_with_a_follow_up_prompt_patch_is_cumulative(
    stack: Stack, git_repo: Path, tmp_path: Path
) -> None:
    first_script = "sed -i 's/hello\"/hello, world\"/' src/hello.py\necho one > one.txt\n"
    command = await submit(stack, git_repo, first_script)
    first = await finished(stack, command.run_id)
    assert first.status is RunStatus.SUCCEEDED and first.patch is not None

    # The repository moves on meanwhile: the rerun stays on the request's base commit.
    (git_repo / "later.txt").write_text("a later commit\n")
    git(git_repo, "add", "later.txt")
    git(git_repo, "commit", "--quiet", "-m", "later")

    follow_up = "test -f one.txt || exit 9\necho two >> one.txt\necho new > two.txt\n"
    rerun = RerunRequest(
        command_id=f"cmd-{uuid.uuid4()}",
        request_id=command.request_id,
        run_id=uuid.uuid4(),
        prompt=follow_up,
    )
    await send(stack, rerun)
    second = await finished(stack, rerun.run_id)

    assert second.status is RunStatus.SUCCEEDED, second.error
    assert second.number == 2
    assert second.base_commit == first.base_commit
    assert second.patch is not None
    applied = clean_clone(git_repo, first.base_commit or "", tmp_path / "applied")
    git(applied, "apply", stdin=second.patch.encode())
    assert 'return "hello, world"' in (applied / "src" / "hello.py").read_text()
    assert (applied / "one.txt").read_text() == "one\ntwo\n"
    assert (applied / "two.txt").read_text() == "new\n"
    assert not (applied / "later.txt").exists()
    request = await in_thread(stack.app.get_request, command.request_id)
    assert request.run_ids == [command.run_id, rerun.run_id]


LOG_SCRIPT = r"""
for i in $(seq 1 300); do echo "line $i"; done
echo "warning: to stderr" >&2
printf 'no final newline'
"""


async def test_log_lines_stream_to_forgeline_logs_in_order(stack: Stack, git_repo: Path) -> None:
    command = await submit(stack, git_repo, LOG_SCRIPT)
    run = await finished(stack, command.run_id)
    assert run.status is RunStatus.SUCCEEDED

    async def run_is_finished() -> bool:
        return True

    records = [
        record
        async for record in read_log(
            stack.js, command.run_id, follow=False, is_finished=run_is_finished
        )
    ]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    stdout = [r["line"] for r in records if r["stream"] == "stdout"]
    assert stdout == [f"line {i}" for i in range(1, 301)] + ["no final newline"]
    assert [r["line"] for r in records if r["stream"] == "stderr"] == ["warning: to stderr"]
    system = [r["line"] for r in records if r["stream"] == "system"]
    assert system[0].startswith("provisioning") and "exited with code 0" in system[-1]

    # The terminal event records how many lines there were and their digest.
    succeeded = await in_thread(stored_event, stack.app, command.run_id, "RunSucceeded")
    assert succeeded.log_lines == len(records)
    digest = hashlib.sha256()
    for payload in await raw_log_payloads(stack.js, command.run_id):
        digest.update(payload + b"\n")
    assert succeeded.log_sha256 == digest.hexdigest()


async def test_following_a_log_while_the_run_writes_it(stack: Stack, git_repo: Path) -> None:
    script = 'for i in $(seq 1 20); do echo "tick $i"; sleep 0.02; done\n'
    command = await submit(stack, git_repo, script)

    async def run_is_finished() -> bool:
        return (await run_now(stack, command.run_id)).is_terminal

    async def follow() -> list[dict[str, Any]]:
        return [
            record
            async for record in read_log(
                stack.js, command.run_id, follow=True, is_finished=run_is_finished
            )
        ]

    records = await asyncio.wait_for(follow(), 20)
    assert [r["line"] for r in records if r["stream"] == "stdout"] == [
        f"tick {i}" for i in range(1, 21)
    ]
    assert (await run_now(stack, command.run_id)).status is RunStatus.SUCCEEDED


def stored_events(app: Forgeline, run_id: UUID) -> list[Any]:
    return list(app.repository.event_store.get(run_id))


def stored_event(app: Forgeline, run_id: UUID, kind: str) -> Any:
    events = [e for e in stored_events(app, run_id) if type(e).__name__ == kind]
    assert len(events) == 1, f"{len(events)} {kind} events"
    return events[0]


async def raw_log_payloads(js: JetStreamContext, run_id: UUID) -> list[bytes]:
    sub = await js.subscribe(
        subjects.log_subject(run_id), stream=subjects.LOGS_STREAM, ordered_consumer=True
    )
    payloads = []
    try:
        while True:
            msg = await sub.next_msg(timeout=2)
            payloads.append(msg.data)
            if msg.metadata.num_pending == 0:
                return payloads
    finally:
        await sub.unsubscribe()


async def test_run_ends_after_nats_lost_some_of_its_log_lines(
    tmp_path: Path, database_url: str, git_repo: Path
) -> None:
    store_dir = tmp_path / "nats"
    server = start_nats(store_dir)
    port = int(server.url.rsplit(":", 1)[1])
    pid = int((store_dir / "nats.pid").read_text())
    go, printed = tmp_path / "go", tmp_path / "printed"
    script = (
        f"echo before\nwhile [ ! -e {go} ]; do sleep 0.01; done\n"
        f"for i in $(seq 1 100); do echo after $i; done\ntouch {printed}\n"
    )
    try:
        async with running_stack(server.url, database_url, tmp_path / "data") as services:
            command = await submit(services, git_repo, script)

            async def first_lines_logged() -> bool:
                info = await services.js.stream_info(subjects.LOGS_STREAM)
                return (info.state.messages or 0) >= 3

            await eventually(first_lines_logged, message="the first lines on FORGELINE_LOGS")
            os.kill(pid, signal.SIGSTOP)  # the server hangs: it reads nothing, acks nothing
            go.touch()
            # While this polls, the worker (same event loop) reads and publishes those lines.
            await eventually(printed.exists, message="the script to print its lines")
            os.kill(pid, signal.SIGKILL)  # ... and dies with those lines unread
            server.stop()
            server = start_nats(store_dir, port=port)

            # The lost lines' acknowledgements are waited for ACK_TIMEOUT_S, then given up.
            run = await finished(services, command.run_id, timeout=ACK_TIMEOUT_S + 20)
            assert run.is_terminal
    finally:
        server.stop()

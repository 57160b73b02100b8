"""LLM agents' runs through the worker's own LLM proxy (local workspaces), as a user sees them:
usage on the run and in its read model, a budget that stops a run whose agent ignores the
proxy's refusals, and the provider's key in no record.

The agent is a python script calling the proxy with urllib (no SDK), registered under the
name `shell` because the request model accepts only the catalogue's agent names.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from psycopg import sql

from broker import subjects
from broker.commands import publish_command
from broker.connection import connect
from domain.application import Forgeline
from domain.commands import RequestSpec, SubmitRequest
from domain.run import Run
from domain.status import RunStatus
from forgeline.bootstrap import Servers, open_store, run_services
from forgeline.embedded import EmbeddedPostgres, start_nats
from forgeline.fake_llm import FakeUpstream, Script, Turn
from forgeline.settings import Settings
from handlers.agents.base import BASE_ENV, LlmAccess
from handlers.workspaces.base import LineSink, Workspace
from tests.integration.conftest import event_type_counts, eventually, in_thread
from tests.support.secrets_scan import scan_database, scan_streams

UPSTREAM_KEY = "sk-live-" + secrets.token_hex(20)
TURN = Turn(text="ok", input_tokens=1000, output_tokens=100)  # 1100 tokens a call

# calls=N: make N calls then exit 0; calls=forever: call on, whatever the proxy answers.
AGENT = r"""
import json, os, sys, time, urllib.error, urllib.request
print("environment:", json.dumps(dict(os.environ), sort_keys=True), flush=True)
with open("NOTES.md", "w") as notes:
    notes.write("written by the agent before its model calls\n")
calls = sys.argv[1]
n = 0
while calls == "forever" or n < int(calls):
    n += 1
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "go"}]}
    request = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
            "content-type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            print("call", n, reply.status, flush=True)
    except urllib.error.HTTPError as refused:
        print("call", n, refused.code, refused.read().decode(), flush=True)
    time.sleep(0.1)
"""


class ScriptedLlmAgent:
    name = "shell"
    needs_llm = True

    async def run(
        self,
        workspace: Workspace,
        *,
        prompt: str,
        options: dict[str, Any],
        on_line: LineSink,
        timeout_s: float,
        llm: LlmAccess | None = None,
    ) -> int:
        assert llm is not None, "an LLM agent is given its access"
        script = await workspace.write_scratch("agent.py", AGENT)
        env = {**BASE_ENV, "OPENAI_BASE_URL": llm.openai_base_url, "OPENAI_API_KEY": llm.token}
        return await workspace.exec(
            ["python3", script, prompt], env=env, on_line=on_line, timeout_s=timeout_s
        )


@dataclass
class Stack:
    js: JetStreamContext
    app: Forgeline
    fake: FakeUpstream
    database_url: str
    task: asyncio.Task[None]


@pytest.fixture(scope="module")
def module_database(pg_server: EmbeddedPostgres) -> Iterator[str]:
    name = f"proxy_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
async def stack(
    module_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    nats = start_nats(tmp_path_factory.mktemp("proxy-nats"))
    async with FakeUpstream(Script(fallback=TURN), api_key=UPSTREAM_KEY) as fake:
        settings = Settings(
            data_dir=tmp_path_factory.mktemp("proxy-data"),
            nats_url=nats.url,
            database_url=module_database,
            provisioner="local",
            worker_name="proxy-worker",
            shutdown_grace_s=5,
            llm_openai_base_url=f"{fake.url}/v1",
            llm_openai_api_key=UPSTREAM_KEY,
            llm_prices={"fake": (2.0, 8.0)},
        )
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_services(
                settings,
                Servers(nats_url=nats.url, database_url=module_database),
                stop,
                roles=frozenset({"worker", "relay", "projector"}),
                agents={"shell": ScriptedLlmAgent()},
            )
        )
        nc: Client = await connect(nats.url, name="proxy-run-tests")
        app = await in_thread(open_store, module_database)
        try:
            js = nc.jetstream()
            await eventually(lambda: js.stream_info(subjects.COMMANDS_STREAM), message="streams")
            yield Stack(js, app, fake, module_database, task)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            app.close()
            await nc.close()
            nats.stop()


async def submit(stack: Stack, repo: Path, calls: str, **budget: Any) -> UUID:
    assert not stack.task.done(), stack.task
    run_id = uuid.uuid4()
    spec = RequestSpec(repo=str(repo), prompt=calls, timeout_s=120, **budget)
    command = SubmitRequest(
        command_id=f"cmd-{uuid.uuid4()}", request_id=uuid.uuid4(), run_id=run_id, spec=spec
    )
    await publish_command(stack.js, command)
    return run_id


async def finished(stack: Stack, run_id: UUID, timeout: float = 30) -> Run:
    async def terminal() -> Run | None:
        run: Run = await in_thread(stack.app.get_run, run_id)
        return run if run.is_terminal else None

    run: Run = await eventually(terminal, timeout, f"run {run_id} to end")
    return run


def run_row(database_url: str, run_id: UUID) -> dict[str, Any] | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, usage, error FROM forgeline_view_runs WHERE id = %s", (run_id,)
        ).fetchone()
    return None if row is None else {"status": row[0], "usage": row[1], "error": row[2]}


def agent_processes(marker: str) -> list[int]:
    """Agent scripts still running: python3 with the run's scratch path in its argv (not the
    `rm -rf` removing the run's finished workspace, whose argv names the run too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0] == b"python3" and any(marker.encode() in arg for arg in argv[1:]):
                found.append(int(entry.name))
    return found


async def test_usage_of_an_llm_agent_shows_on_its_run(stack: Stack, git_repo: Path) -> None:
    run_id = await submit(stack, git_repo, "3", max_tokens=100_000, budget_usd=1.0)
    run = await finished(stack, run_id)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert (run.model_calls, run.input_tokens, run.output_tokens) == (3, 3000, 300)
    assert run.cost_usd == pytest.approx(3 * (1000 * 2.0 + 100 * 8.0) / 1e6)
    assert "NOTES.md" in (run.patch or "")

    view = await eventually(
        lambda: (
            (row := run_row(stack.database_url, run_id)) and row["status"] == "succeeded" and row
        ),
        message="the run's read model",
    )
    assert view["usage"] == {"input_tokens": 3000, "output_tokens": 300, "cost_usd": 0.0084}


async def test_a_budget_crossed_stops_the_agent_and_fails_the_run(
    stack: Stack, git_repo: Path
) -> None:
    run_id = await submit(stack, git_repo, "forever", max_tokens=3000)
    run = await finished(stack, run_id)
    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error["code"] == "budget_exceeded"
    assert "3300 of 3000 tokens" in run.error["message"]
    # Stopped by its worker, not by its timeout (120 s): no agent process is left.
    assert run.finished_at is not None and run.started_at is not None
    assert (run.finished_at - run.started_at).total_seconds() < 30
    assert agent_processes(str(run_id)) == []
    # What it did before is kept, and nothing past the third call reached the provider.
    assert "NOTES.md" in (run.patch or "")
    assert run.model_calls == 3
    counts = event_type_counts(stack.database_url)
    assert counts["RunFailed"] == 1
    view = await eventually(
        lambda: (row := run_row(stack.database_url, run_id)) and row["status"] == "failed" and row,
        message="the run's read model",
    )
    assert view["error"]["code"] == "budget_exceeded"
    assert view["usage"]["input_tokens"] == 3000


async def test_the_provider_key_reaches_no_record(stack: Stack, git_repo: Path) -> None:
    """After LLM runs (the agent printed its whole environment to its log), the key is in no
    event, table or stream: the agent never had it."""
    run_id = await submit(stack, git_repo, "1")
    assert (await finished(stack, run_id)).status is RunStatus.SUCCEEDED
    await eventually(
        lambda: (row := run_row(stack.database_url, run_id)) and row["status"] == "succeeded",
        message="projected",
    )
    leaks = scan_database(stack.database_url, UPSTREAM_KEY)
    leaks += await scan_streams(stack.js, UPSTREAM_KEY)
    assert leaks == []
    assert await scan_streams(stack.js, "OPENAI_API_KEY")  # the log does hold the environment
    assert os.environ.get("FORGELINE_LLM_OPENAI_API_KEY") is None

"""The real agent CLIs (mini-swe-agent, Codex, Claude Code) in Docker workspaces, through the
real LLM proxy, against the scripted fake provider: each makes an edit, the patch applies, the
usage recorded equals what the provider reported (and what the agent printed), the provider's
key is nowhere in the store, the streams or the logs, and the run's token never reached the
provider; a run past its token budget is stopped. Everything runs as a user would: HTTP to the
gateway of `run_services`.

Each test prints the agent's overhead before its first model call (RunStarted to the fake's
first request) and its whole run; `pytest -s` shows them (docs/agents.md quotes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiodocker
import httpx
import psycopg
import pytest
from nats.aio.client import Client
from psycopg import sql
from pydantic import SecretStr

from broker.connection import connect
from forgeline.bootstrap import Servers, run_services
from forgeline.embedded import EmbeddedPostgres, start_nats
from forgeline.fake_llm import FakeUpstream, ReceivedRequest, edit_file_script
from forgeline.settings import Settings
from handlers.agents import all_agents
from handlers.agents.base import ReportedUsage
from tests.integration.conftest import eventually
from tests.support.secrets_scan import scan_database, scan_streams

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

UPSTREAM_KEY = "sk-agents-" + secrets.token_hex(20)
ADMIN_KEY = "fl_agents_admin_" + secrets.token_hex(16)
EDITED, CONTENT = "AGENT_WAS_HERE.md", "Edited by the agent, on the fake model's orders.\n"
TERMINAL = {"patch_ready", "failed", "cancelled"}


@dataclass
class Stack:
    http: httpx.AsyncClient
    fake: FakeUpstream
    database: str
    nc: Client


@pytest.fixture(scope="module")
def database(pg_server: EmbeddedPostgres) -> Iterator[str]:
    name = f"agents_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
async def stack(database: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """Every role in this process with Docker workspaces and the LLM proxy in front of the
    fake provider (both protocols), which holds the only real key."""
    try:
        docker = aiodocker.Docker()
        async with asyncio.timeout(5):
            await docker.version()
        await docker.close()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Docker engine answers ({exc}); CI must provide one")
        pytest.skip(f"no Docker engine answers: {exc}")
    tmp = tmp_path_factory.mktemp("agents")
    nats = start_nats(tmp / "nats")
    fake = FakeUpstream(edit_file_script(EDITED, CONTENT), api_key=UPSTREAM_KEY)
    async with fake:
        settings = Settings(
            data_dir=tmp / "data",
            nats_url=nats.url,
            database_url=database,
            provisioner="docker",
            worker_name="agents-worker",
            host="127.0.0.1",
            port=0,
            shutdown_grace_s=5,
            admin_key=SecretStr(ADMIN_KEY),
            rate_limit_per_min=0,
            llm_openai_base_url=f"{fake.url}/v1",
            llm_openai_api_key=SecretStr(UPSTREAM_KEY),
            llm_anthropic_base_url=fake.url,
            llm_anthropic_api_key=SecretStr(UPSTREAM_KEY),
        )
        port: list[int] = []
        stop = asyncio.Event()
        services = asyncio.create_task(
            run_services(
                settings,
                Servers(nats_url=nats.url, database_url=database),
                stop,
                on_ready=port.append,
            )
        )
        nc = await connect(nats.url, name="agents-test")
        try:
            # The first start may build the workspace image (scripts/test.sh builds it first).
            await eventually(lambda: port or services.done(), 1200, "the services")
            assert not services.done(), services
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            base = f"http://127.0.0.1:{port[0]}"
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
                yield Stack(http, fake, database, nc)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(services, 60)
            await nc.close()
            nats.stop()


async def _submit(stack: Stack, repo: Path, agent: str, options: dict[str, Any]) -> str:
    body = {"repo": str(repo), "prompt": f"Write {EDITED}.", "agent": agent,
            "agent_options": options, "timeout_s": 300}  # fmt: skip
    answer = await stack.http.post("/v1/requests", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["request_id"])


async def _finished(stack: Stack, request_id: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        answer = await stack.http.get(f"/v1/requests/{request_id}")
        view: dict[str, Any] | None = answer.json() if answer.status_code == 200 else None
        return view if view and view["status"] in TERMINAL and view["runs"] else None

    view: dict[str, Any] = await eventually(ended, 600, f"request {request_id} to end")
    run: dict[str, Any] = (await stack.http.get(f"/v1/runs/{view['latest_run_id']}")).json()
    return run


async def _log_lines(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    answer = await stack.http.get(f"/v1/runs/{run_id}/logs", params={"follow": "0"})
    return [
        json.loads(line[6:])
        for line in answer.text.splitlines()
        if line.startswith("data: ") and '"seq"' in line
    ]


def _applies(repo: Path, patch: str, tmp: Path) -> str:
    """The edited file after `git apply` of the patch on a fresh clone."""
    clone = tmp / f"clone-{uuid.uuid4().hex[:8]}"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    subprocess.run(["git", "apply", "-"], cwd=clone, input=patch.encode(), check=True)
    return (clone / EDITED).read_text()


def _authenticated_with_the_real_key(request: ReceivedRequest) -> bool:
    presented = request.headers.get("x-api-key") or request.headers.get("authorization", "")
    return presented in (UPSTREAM_KEY, f"Bearer {UPSTREAM_KEY}")


@pytest.mark.parametrize(
    ("agent", "options"),
    [
        ("mini-swe-agent", {"model": "gpt-5-mini", "step_limit": 10}),
        ("codex", {"model": "gpt-5"}),
        ("claude-code", {"model": "claude-sonnet-4-5", "max_turns": 10}),
    ],
)
async def test_a_real_agent_edits_through_the_proxy_and_is_metered(
    stack: Stack, git_repo: Path, tmp_path: Path, agent: str, options: dict[str, Any]
) -> None:
    fake = stack.fake
    seen, in_before, out_before = len(fake.requests), *_totals(fake)
    request_id = await _submit(stack, git_repo, agent, options)
    run = await _finished(stack, request_id)
    lines = await _log_lines(stack, run["id"])
    assert run["status"] == "succeeded", (run["error"], [x["line"] for x in lines][-30:])

    # The edit is in the patch, and the patch applies to the repository.
    patch = (await stack.http.get(f"/v1/runs/{run['id']}/patch")).text
    assert _applies(git_repo, patch, tmp_path) == CONTENT

    # Usage: what the provider reported = what the proxy recorded = what the agent printed.
    calls = [r for r in fake.requests[seen:] if r.path in ("/v1/responses", "/v1/messages",
                                                          "/v1/chat/completions")]  # fmt: skip
    assert calls, "the agent never called the model"
    in_after, out_after = _totals(fake)
    reported = ReportedUsage(in_after - in_before, out_after - out_before)
    assert reported.input_tokens > 0
    usage = run["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (
        reported.input_tokens,
        reported.output_tokens,
    )
    assert usage["cost_usd"] > 0
    stdout = [x["line"] for x in lines if x["stream"] == "stdout"]
    printed = all_agents()[agent].usage_from_output(stdout)  # type: ignore[attr-defined]
    assert printed is not None
    assert (printed.input_tokens, printed.output_tokens) == (
        reported.input_tokens,
        reported.output_tokens,
    )

    # Secrets: the real key reached the provider, and only there; the run's token did not.
    assert all(_authenticated_with_the_real_key(r) for r in calls)
    for received in fake.requests[seen:]:
        assert "flrun_" not in json.dumps([received.headers, received.body])
    assert UPSTREAM_KEY not in json.dumps(lines)
    assert await scan_streams(stack.nc.jetstream(), UPSTREAM_KEY) == []
    assert await asyncio.to_thread(scan_database, stack.database, UPSTREAM_KEY) == []

    # The overhead before the first model call: from RunStarted (the agent's exec follows it)
    # to the provider's first request.
    events = (await stack.http.get(f"/v1/requests/{request_id}/events")).json()["events"]
    started = next(e for e in events if e["type"] == "RunStarted")["timestamp"]
    overhead = calls[0].at - datetime.fromisoformat(started).timestamp()
    took = datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(started)
    print(
        f"\n{agent}: {overhead:.2f} s from RunStarted to its first model call; "
        f"{len(calls)} model calls; {took.total_seconds():.1f} s from RunStarted to the end"
    )
    assert 0 < overhead < 120


def _totals(fake: FakeUpstream) -> tuple[int, int]:
    return fake.usage_reported.input_tokens, fake.usage_reported.output_tokens


async def test_command_agent_gets_the_prompt_file_and_the_proxy_in_its_env(
    stack: Stack, git_repo: Path, tmp_path: Path
) -> None:
    script = 'cp "$1" PROMPT.md && case "$OPENAI_API_KEY" in flrun_*) echo token-ok;; esac'
    argv = ["bash", "-c", script, "agent", "{prompt_file}"]
    request_id = await _submit(stack, git_repo, "command", {"argv": argv})
    run = await _finished(stack, request_id)
    lines = [x["line"] for x in await _log_lines(stack, run["id"])]
    assert run["status"] == "succeeded", (run["error"], lines[-20:])
    assert "token-ok" in lines
    patch = (await stack.http.get(f"/v1/runs/{run['id']}/patch")).text
    assert f"+Write {EDITED}." in patch


async def test_bad_agent_options_are_a_422_at_submit_and_record_nothing(
    stack: Stack, git_repo: Path
) -> None:
    before = (await stack.http.get("/v1/requests")).json()["items"]
    for agent, options in [
        ("codex", {"model": 5}),
        ("claude-code", {"max_turns": 0}),
        ("mini-swe-agent", {"cost_limit": 3}),
        ("command", {"argv": ["no-prompt-here"]}),
    ]:
        body = {"repo": str(git_repo), "prompt": "p", "agent": agent, "agent_options": options}
        answer = await stack.http.post("/v1/requests", json=body)
        assert answer.status_code == 422, (agent, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "validation_failed"
        assert any(d["field"] == "agent_options" for d in error["details"]), error
        assert agent in json.dumps(error["details"])
    # Refused before anything was published: the list is as it was.
    assert (await stack.http.get("/v1/requests")).json()["items"] == before


async def test_agents_are_listed_with_their_option_schemas(stack: Stack) -> None:
    listed = (await stack.http.get("/v1/agents")).json()["agents"]
    by_name = {a["name"]: a for a in listed}
    assert set(by_name) == {"shell", "command", "mini-swe-agent", "codex", "claude-code"}
    assert by_name["shell"]["needs_llm"] is False and by_name["codex"]["needs_llm"] is True
    assert by_name["codex"]["options_schema"]["properties"]["model"]["type"] == "string"
    assert by_name["command"]["options_schema"]["required"] == ["argv"]


async def test_a_real_agent_past_its_token_budget_is_stopped_as_budget_exceeded(
    stack: Stack, git_repo: Path
) -> None:
    # Codex's first call alone is thousands of input tokens: the budget is spent after it.
    body = {"repo": str(git_repo), "prompt": f"Write {EDITED}.", "agent": "codex",
            "max_tokens": 500, "timeout_s": 300}  # fmt: skip
    answer = await stack.http.post("/v1/requests", json=body)
    assert answer.status_code == 202, answer.text
    run = await _finished(stack, str(answer.json()["request_id"]))
    assert run["status"] == "failed"
    assert run["error"]["code"] == "budget_exceeded", run["error"]
    assert run["usage"]["input_tokens"] + run["usage"]["output_tokens"] > 500

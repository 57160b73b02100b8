"""A Docker workspace of an LLM agent reaches the worker's LLM proxy and nothing else.

The agent is a probe run in the workspace: it calls a model through the proxy (the forwarder
on 127.0.0.1:4141 and the proxy's bind-mounted socket) and tries every other way out: a
service listening on all of the host's addresses, the Docker bridge's gateway, an outside
address, the Docker socket, writing into the proxy's socket folder. It writes what happened to
probe.json, which comes back in the run's patch.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import psycopg
import pytest
from psycopg import sql

from broker.commands import publish_command
from broker.connection import connect
from domain.commands import RequestSpec, SubmitRequest
from domain.run import Run
from domain.status import RunStatus
from forgeline.bootstrap import Servers, open_store, run_services
from forgeline.embedded import EmbeddedPostgres, start_nats
from forgeline.fake_llm import FakeUpstream, Script, Turn
from forgeline.settings import Settings
from handlers.agents.base import BASE_ENV, LlmAccess
from handlers.workspaces.base import LineSink, Workspace
from tests.integration.conftest import eventually, in_thread
from tests.support.secrets_scan import scan_database

pytestmark = pytest.mark.docker

UPSTREAM_KEY = "sk-docker-" + secrets.token_hex(20)

PROBE = r"""
import json, os, socket, sys, urllib.request
results = {"interfaces": sorted(os.listdir("/sys/class/net"))}
with urllib.request.urlopen("http://127.0.0.1:4141/healthz", timeout=5) as reply:
    results["proxy_health"] = reply.status
body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
call = urllib.request.Request(
    os.environ["OPENAI_BASE_URL"] + "/chat/completions",
    data=json.dumps(body).encode(),
    headers={"authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
             "content-type": "application/json"},
)
with urllib.request.urlopen(call, timeout=10) as reply:
    results["model_call"] = [reply.status, json.load(reply)["usage"]["prompt_tokens"]]
results["reached"] = {}
for target in json.loads(sys.argv[1]):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        results["reached"][target] = "connected"
    except OSError as exc:
        results["reached"][target] = type(exc).__name__ + ": " + (exc.strerror or str(exc))
results["docker_socket"] = os.path.exists("/var/run/docker.sock")
results["proxy_folder"] = sorted(os.listdir("/run/forgeline-llm"))
try:
    open("/run/forgeline-llm/planted", "w").close()
    results["proxy_folder_writable"] = True
except OSError:
    results["proxy_folder_writable"] = False
results["key_in_env"] = any(sys.argv[2] in value for value in os.environ.values())
with open("probe.json", "w") as out:
    json.dump(results, out, indent=1, sort_keys=True)
"""


class ProbeAgent:
    name = "shell"  # a name the request model accepts
    needs_llm = True

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets

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
        assert llm is not None
        script = await workspace.write_scratch("probe.py", PROBE)
        env = {**BASE_ENV, "OPENAI_BASE_URL": llm.openai_base_url, "OPENAI_API_KEY": llm.token}
        argv = ["python3", script, json.dumps(self.targets), UPSTREAM_KEY[-16:]]
        return await workspace.exec(argv, env=env, on_line=on_line, timeout_s=timeout_s)


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[None]:
    try:
        docker = aiodocker.Docker()
        async with asyncio.timeout(5):
            await docker.version()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Docker engine answers ({exc}); CI must provide one")
        pytest.skip(f"no Docker engine answers: {exc}")
    await docker.close()
    yield


@pytest.fixture
def host_service() -> Iterator[int]:
    """A TCP service on every address of the host: what a workspace must not reach."""
    with socket.create_server(("0.0.0.0", 0)) as server:
        server.listen()
        yield int(server.getsockname()[1])


def host_addresses() -> list[str]:
    addresses = {"172.17.0.1"}  # the Docker bridge's gateway, the host as containers see it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this picks the outgoing address
        addresses.add(probe.getsockname()[0])
    return sorted(addresses)


@pytest.fixture
def database(pg_server: EmbeddedPostgres) -> Iterator[str]:
    name = f"proxydocker_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def probe_results(patch: str) -> dict[str, Any]:
    lines, inside = [], False
    for line in patch.splitlines():
        if line.startswith("+++ "):
            inside = line.endswith("/probe.json")
        elif inside and line.startswith("+"):
            lines.append(line[1:])
    result: dict[str, Any] = json.loads("\n".join(lines))
    return result


async def test_an_llm_workspace_reaches_the_proxy_and_nothing_else(
    engine: None, database: str, git_repo: Path, tmp_path: Path, host_service: int
) -> None:
    targets = [f"{address}:{host_service}" for address in host_addresses()]
    targets.append("1.1.1.1:443")
    # The host service answers on the host's own addresses: the probe's targets are live.
    for target in targets[:-1]:
        host, port = target.rsplit(":", 1)
        if host != "172.17.0.1":
            socket.create_connection((host, int(port)), timeout=3).close()

    run = await run_in_docker(ProbeAgent(targets), database, git_repo, tmp_path)
    assert run.status is RunStatus.SUCCEEDED, run.error
    results = probe_results(run.patch or "")
    assert results["interfaces"] == ["lo"]
    assert results["proxy_health"] == 200
    assert results["model_call"] == [200, 77]
    assert run.model_calls == 1 and run.input_tokens == 77
    for target in targets:
        assert results["reached"][target].startswith("OSError: Network is unreachable"), (
            target,
            results["reached"][target],
        )
    assert results["docker_socket"] is False
    assert results["proxy_folder"] == ["llm.sock"]
    assert results["proxy_folder_writable"] is False
    assert results["key_in_env"] is False
    assert scan_database(database, UPSTREAM_KEY) == []


LOOP = r"""
import json, os, time, urllib.error, urllib.request
open("STARTED.md", "w").write("the agent began\n")
while True:  # on and on, whatever the proxy answers: only its worker can stop it
    call = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions",
        data=json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "go"}]}
                        ).encode(),
        headers={"authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
                 "content-type": "application/json"},
    )
    try:
        urllib.request.urlopen(call, timeout=10).close()
    except urllib.error.HTTPError:
        pass
    time.sleep(0.1)
"""


class LoopingAgent(ProbeAgent):
    def __init__(self) -> None:
        super().__init__([])

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
        assert llm is not None
        script = await workspace.write_scratch("loop.py", LOOP)
        env = {**BASE_ENV, "OPENAI_BASE_URL": llm.openai_base_url, "OPENAI_API_KEY": llm.token}
        return await workspace.exec(
            ["python3", script], env=env, on_line=on_line, timeout_s=timeout_s
        )


async def test_a_budget_crossed_in_docker_stops_the_agent_and_keeps_its_patch(
    engine: None, database: str, git_repo: Path, tmp_path: Path
) -> None:
    run = await run_in_docker(LoopingAgent(), database, git_repo, tmp_path, max_tokens=200)
    assert run.error is not None and run.error["code"] == "budget_exceeded", run.error
    assert run.model_calls == 3  # 82 tokens a call: the third one crossed 200
    assert "STARTED.md" in (run.patch or "")
    assert run.finished_at is not None and run.started_at is not None
    assert (run.finished_at - run.started_at).total_seconds() < 60  # not its 120 s timeout


async def run_in_docker(
    agent: ProbeAgent, database: str, repo: Path, tmp_path: Path, **budget: Any
) -> Run:
    """Runs one request with agent in a Docker workspace, through a worker of its own and the
    fake provider (77 + 5 tokens a call); the run once it ended."""
    nats = start_nats(tmp_path / "nats")
    fake = FakeUpstream(
        Script(fallback=Turn(text="ok", input_tokens=77, output_tokens=5)), api_key=UPSTREAM_KEY
    )
    async with fake:
        settings = Settings(
            data_dir=tmp_path / "data",
            nats_url=nats.url,
            database_url=database,
            provisioner="docker",
            worker_name="proxy-docker-worker",
            shutdown_grace_s=5,
            llm_openai_base_url=f"{fake.url}/v1",
            llm_openai_api_key=UPSTREAM_KEY,
        )
        stop = asyncio.Event()
        ready = asyncio.Event()
        services = asyncio.create_task(
            run_services(
                settings,
                Servers(nats_url=nats.url, database_url=database),
                stop,
                roles=frozenset({"worker", "relay", "projector"}),
                agents={"shell": agent},
                on_ready=lambda port: ready.set(),
            )
        )
        nc = await connect(nats.url, name="proxy-docker-test")
        app = await in_thread(open_store, database)
        try:
            js = nc.jetstream()
            # The first start on a machine builds the workspace image (minutes).
            await eventually(lambda: ready.is_set() or services.done(), 900, "the worker")
            assert not services.done(), services
            run_id = uuid.uuid4()
            spec = RequestSpec(repo=str(repo), prompt="go", timeout_s=120, **budget)
            await publish_command(
                js,
                SubmitRequest(
                    command_id=f"cmd-{run_id}", request_id=uuid.uuid4(), run_id=run_id, spec=spec
                ),
            )

            async def ended() -> Run | None:
                assert not services.done(), services
                run: Run = await in_thread(app.get_run, run_id)
                return run if run.is_terminal else None

            run: Run = await eventually(ended, 120, "the run to end")
        finally:
            stop.set()
            await asyncio.wait_for(services, 60)
            await nc.close()
            nats.stop()
            app.close()
    return run

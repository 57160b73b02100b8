"""Docker workspaces against a real engine, driven as a deployment runs them.

Each test starts the worker, relay and projector roles (run_services) with the `docker`
provisioner on its own NATS server and database, publishes commands to JetStream as the gateway
does, and reads what a user would see from the event store and the run's log: the patch, the
failure code and message, and the containers left on the engine (none).

The engine-restart test stops and starts dockerd: it runs last and restores the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import aiodocker
import psycopg
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from psycopg import sql

from broker.commands import publish_command
from broker.connection import connect
from broker.logs import read_log
from domain.application import Forgeline
from domain.commands import CancelRequest, RequestSpec, SubmitRequest
from domain.run import Run
from domain.status import FailureCode, RunStatus
from forgeline.bootstrap import Servers, installation_id, open_store, run_services
from forgeline.embedded import start_nats
from forgeline.provisioning import Workspaces
from forgeline.settings import Settings
from handlers.workspaces.base import WorkspaceSpec
from handlers.workspaces.docker import ContainerLimits, DockerProvisioner
from handlers.workspaces.docker_engine import (
    LABEL_INSTALLATION,
    LABEL_MANAGED,
    LABEL_RUN,
    LABEL_WORKER,
)
from handlers.workspaces.image import ensure_image
from tests.integration.conftest import eventually

pytestmark = pytest.mark.docker

ROLES = frozenset({"worker", "relay", "projector"})
LABEL_TEST = "org.forgeline.test"  # on every container a test plants, for the clean-up
ENGINE_TIMEOUT_S = 5.0
DOCKERD_LOG = "/var/log/forgeline-dockerd.log"


# -- the engine and the image ---------------------------------------------------------------


async def engine_answers(docker: aiodocker.Docker) -> bool:
    try:
        async with asyncio.timeout(ENGINE_TIMEOUT_S):
            await docker.version()
    except Exception:
        return False
    return True


def no_engine(reason: str) -> None:
    """Skips the module, or fails it in CI, where an engine is guaranteed."""
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"{reason}; CI must provide a Docker engine: run scripts/ensure-docker.sh first",
            pytrace=False,
        )
    pytest.skip(f"{reason} (scripts/ensure-docker.sh starts one)")


@pytest.fixture(scope="session")
async def docker() -> AsyncIterator[aiodocker.Docker]:
    try:
        client = aiodocker.Docker()
    except Exception as exc:
        no_engine(f"no Docker engine: {exc}")
    if not await engine_answers(client):
        await client.close()
        no_engine("no Docker engine answers")
    yield client
    await client.close()


@pytest.fixture(scope="session")
async def image(docker: aiodocker.Docker, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The workspace image, built first when missing (fast when the engine has it)."""
    name = Settings.model_fields["workspace_image"].default
    return await ensure_image(
        docker,
        name,
        mirror=None,
        progress=lambda line: print(f"image: {line}"),
        cache_dir=tmp_path_factory.mktemp("image-cache"),
    )


async def containers(docker: aiodocker.Docker, *labels: str) -> list[Any]:
    """Containers (running or not) with every `key=value` label given."""
    async with asyncio.timeout(ENGINE_TIMEOUT_S * 2):
        return await docker.containers.list(all=True, filters=json.dumps({"label": list(labels)}))


async def remove_all(docker: aiodocker.Docker, *labels: str) -> None:
    with contextlib.suppress(Exception):
        for container in await containers(docker, *labels):
            with contextlib.suppress(Exception):
                await container.delete(force=True)


# -- Forgeline's roles in this test's event loop --------------------------------------------


@dataclass
class Deployment:
    """The worker, relay and projector on this test's NATS and database, and ways to watch."""

    settings: Settings
    app: Forgeline
    nc: Client
    js: JetStreamContext
    docker: aiodocker.Docker
    services: asyncio.Task[None]
    installation: str
    submitted: dict[UUID, UUID] = field(default_factory=dict)  # run id -> request id

    def _check_services(self) -> None:
        if self.services.done():
            raise AssertionError(f"run_services stopped: {self.services.exception()!r}")

    async def submit(self, repo: Path, script: str, *, timeout_s: int = 120) -> UUID:
        request_id, run_id = uuid.uuid4(), uuid.uuid4()
        spec = RequestSpec(repo=str(repo), prompt=script, timeout_s=timeout_s)
        command = SubmitRequest(
            command_id=f"cmd-{uuid.uuid4()}", request_id=request_id, run_id=run_id, spec=spec
        )
        await publish_command(self.js, command)
        self.submitted[run_id] = request_id
        return run_id

    async def cancel(self, run_id: UUID) -> None:
        command = CancelRequest(
            command_id=f"cmd-{uuid.uuid4()}", request_id=self.submitted[run_id], run_id=run_id
        )
        await publish_command(self.js, command)

    async def run(self, run_id: UUID) -> Run:
        return await asyncio.to_thread(self.app.get_run, run_id)

    async def wait_for(
        self, run_id: UUID, accept: Callable[[Run], bool], timeout: float, what: str
    ) -> Run:
        async def check() -> Run | None:
            self._check_services()
            run = await self.run(run_id)
            return run if accept(run) else None

        run: Run = await eventually(check, timeout=timeout, message=what, interval=0.05)
        return run

    async def wait_terminal(self, run_id: UUID, timeout: float) -> Run:
        return await self.wait_for(run_id, lambda r: r.is_terminal, timeout, f"run {run_id} to end")

    async def wait_running(self, run_id: UUID, timeout: float = 30) -> Run:
        return await self.wait_for(
            run_id, lambda r: r.status is RunStatus.RUNNING, timeout, f"run {run_id} to run"
        )

    async def log(self, run_id: UUID) -> list[tuple[str, str]]:
        """(stream, line) of every line the run's log holds so far."""

        async def never() -> bool:
            return False

        return [
            (record["stream"], record["line"])
            async for record in read_log(self.js, run_id, follow=False, is_finished=never)
        ]

    async def wait_log_line(self, run_id: UUID, line: str, timeout: float = 30) -> None:
        async def seen() -> bool:
            self._check_services()
            return ("stdout", line) in await self.log(run_id)

        await eventually(seen, timeout=timeout, message=f"{line!r} in the log", interval=0.1)

    async def containers_of(self, run_id: UUID) -> list[Any]:
        return await containers(self.docker, f"{LABEL_RUN}={run_id}")

    async def wait_no_container(self, run_id: UUID, timeout: float = 10) -> None:
        async def gone() -> bool:
            return not await self.containers_of(run_id)

        await eventually(gone, timeout=timeout, message=f"no container of run {run_id}")

    def workspaces(self) -> Workspaces:
        """The reaper as the worker runs it, against this deployment's store."""
        return Workspaces(
            provisioner=None,  # type: ignore[arg-type]  # reap_once does not use it
            description="reaper of the test",
            isolated=True,
            _docker=self.docker,
            _app=self.app,
            _installation=self.installation,
        )


@asynccontextmanager
async def deployment(
    nats_url: str,
    database_url: str,
    data_dir: Path,
    docker: aiodocker.Docker,
    image: str,
    **overrides: Any,
) -> AsyncIterator[Deployment]:
    worker = f"test-docker-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        provisioner="docker",
        data_dir=data_dir,
        nats_url=nats_url,
        database_url=database_url,
        worker_name=worker,
        worker_slots=4,
        workspace_image=image,
        shutdown_grace_s=5,
        **overrides,
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    services = asyncio.create_task(
        run_services(
            settings,
            Servers(nats_url=nats_url, database_url=database_url),
            stop,
            roles=ROLES,
            on_ready=lambda _port: ready.set(),
        )
    )
    app: Forgeline | None = None
    nc: Client | None = None
    try:
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({services, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if services.done():
            await services  # raises why it could not start
        assert ready.is_set(), "run_services did not get ready within 60 s"
        app = await asyncio.to_thread(open_store, database_url)
        nc = await connect(nats_url, name="docker-workspace-tests")
        installation = await asyncio.to_thread(installation_id, database_url)
        yield Deployment(settings, app, nc, nc.jetstream(), docker, services, installation)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(services, 60)
        if nc is not None:
            await nc.close()
        if app is not None:
            await asyncio.to_thread(app.close)
        await remove_all(docker, f"{LABEL_WORKER}={worker}")


@pytest.fixture
def deploy(
    own_nats: str, database_url: str, tmp_path: Path, docker: aiodocker.Docker, image: str
) -> Callable[..., Any]:
    """deploy(**settings) -> an async context manager running the roles with those settings."""

    def start(**overrides: Any) -> Any:
        return deployment(own_nats, database_url, tmp_path / "data", docker, image, **overrides)

    return start


def git(cwd: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, input=stdin, capture_output=True, text=True, check=True
    )
    return done.stdout


def stdout_of(log: list[tuple[str, str]]) -> list[str]:
    return [line for stream, line in log if stream == "stdout"]


def stderr_of(log: list[tuple[str, str]]) -> str:
    return "\n".join(line for stream, line in log if stream == "stderr")


def report(run: Run, log: list[tuple[str, str]]) -> str:
    lines = "\n".join(f"  [{stream}] {line}" for stream, line in log)
    return f"run {run.id}: {run.status} {run.error} exit={run.exit_code}\n{lines}"


# -- 1. a run in a container, and its patch -------------------------------------------------


async def test_shell_run_happens_in_a_container_and_its_patch_applies(
    deploy: Callable[..., Any], git_repo: Path, tmp_path: Path
) -> None:
    script = (
        "set -e\n"
        'echo "uid=$(id -u)"\n'
        'echo "hostname=$(cat /proc/sys/kernel/hostname)"\n'
        "printf 'written in a container\\n' > NOTES.md\n"
        'sed -i \'s/"hello"/"hello from docker"/\' src/hello.py\n'
    )
    async with deploy() as fl:
        started = time.monotonic()
        run_id = await fl.submit(git_repo, script)
        run = await fl.wait_terminal(run_id, timeout=60)
        elapsed = time.monotonic() - started
        log = await fl.log(run_id)
        print(f"\nsubmit to terminal: {elapsed:.2f} s")
        assert run.status is RunStatus.SUCCEEDED, report(run, log)
        out = stdout_of(log)
        assert "uid=1000" in out, report(run, log)
        hostnames = [line.removeprefix("hostname=") for line in out if "hostname=" in line]
        assert hostnames and hostnames[0] not in ("", socket.gethostname()), report(run, log)
        assert run.provisioner == "docker"

        clone = tmp_path / "clone"
        git(tmp_path, "clone", "--quiet", str(git_repo), str(clone))
        git(clone, "checkout", "--quiet", str(run.base_commit))
        assert run.patch
        git(clone, "apply", "--index", "-", stdin=run.patch)
        assert (clone / "NOTES.md").read_text() == "written in a container\n"
        assert '"hello from docker"' in (clone / "src" / "hello.py").read_text()
        assert git(clone, "status", "--porcelain").splitlines() == [
            "A  NOTES.md",
            "M  src/hello.py",
        ]

        await fl.wait_no_container(run_id)


# -- 2. the memory limit --------------------------------------------------------------------


async def test_memory_limit_fails_the_run_with_a_message_about_memory(
    deploy: Callable[..., Any], git_repo: Path
) -> None:
    script = 'echo allocating\npython3 -c "b = bytearray(500 * 1024 * 1024)"\n'
    async with deploy(workspace_memory_mb=64) as fl:
        run_id = await fl.submit(git_repo, script)
        run = await fl.wait_terminal(run_id, timeout=60)
        log = await fl.log(run_id)
        assert run.status is RunStatus.FAILED, report(run, log)
        assert run.error is not None
        assert run.error["code"] == FailureCode.AGENT_FAILED, report(run, log)
        print(f"\nout of memory: {run.error['message']}")
        assert "memory" in run.error["message"].lower(), report(run, log)
        assert "Killed" in stderr_of(log), report(run, log)
        await fl.wait_no_container(run_id)


# -- 3. a fork bomb -------------------------------------------------------------------------


async def test_fork_bomb_is_contained_by_the_pids_limit_and_the_timeout(
    deploy: Callable[..., Any], docker: aiodocker.Docker, git_repo: Path
) -> None:
    timeout_s = 6
    script = "echo forking\nbomb() { bomb | bomb; }\nbomb\n"
    async with deploy(workspace_pids=64) as fl:
        run_id = await fl.submit(git_repo, script, timeout_s=timeout_s)
        await fl.wait_running(run_id)
        started = time.monotonic()
        run = await fl.wait_terminal(run_id, timeout=timeout_s + 30)
        took = time.monotonic() - started
        log = await fl.log(run_id)
        print(f"\nfork bomb: ended {took:.1f} s after the run started: {run.error}")
        assert run.status is RunStatus.FAILED, report(run, log)
        assert took < timeout_s + 15, report(run, log)
        # The host is fine: it starts processes, and the engine answers at once.
        assert subprocess.run(["true"], timeout=5).returncode == 0
        assert await engine_answers(docker)
        await fl.wait_no_container(run_id, timeout=20)


async def test_timeout_is_reported_as_timeout_when_the_agent_holds_every_pid(
    deploy: Callable[..., Any], git_repo: Path
) -> None:
    timeout_s = 5
    script = "echo filling\nfor i in $(seq 100); do sleep 600 & done\nwait\n"
    async with deploy(workspace_pids=32) as fl:
        run_id = await fl.submit(git_repo, script, timeout_s=timeout_s)
        run = await fl.wait_terminal(run_id, timeout=timeout_s + 40)
        log = await fl.log(run_id)
        print(f"\npids full: {run.error}")
        assert run.status is RunStatus.FAILED, report(run, log)
        assert run.error is not None
        assert run.error["code"] == FailureCode.TIMEOUT, report(run, log)
        await fl.wait_no_container(run_id, timeout=20)


# -- 4. no network by default ---------------------------------------------------------------


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge: what a container with network reaches."""
    out = subprocess.run(
        [
            "docker",
            "network",
            "inspect",
            "bridge",
            "--format",
            "{{(index .IPAM.Config 0).Gateway}}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout.strip()
    return out or "172.17.0.1"


def connect_script(host: str, port: int) -> str:
    return (
        "python3 - <<'EOF'\n"
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), 2).close()\n"
        "except OSError as exc:\n"
        "    print(f'connect failed: {exc}', file=sys.stderr)\n"
        "    sys.exit(1)\n"
        "print('connected')\n"
        "EOF\n"
    )


async def test_workspace_reaches_no_network_by_default(
    deploy: Callable[..., Any],
    docker: aiodocker.Docker,
    image: str,
    git_repo: Path,
    tmp_path: Path,
) -> None:
    host = bridge_gateway()
    listener = socket.create_server(("0.0.0.0", 0))
    listener.settimeout(0)
    port = listener.getsockname()[1]
    script = connect_script(host, port)
    try:
        # The control: the same script with the network allowed reaches the host's listener.
        provisioner = DockerProvisioner(
            docker,
            image,
            ContainerLimits(network=True),
            worker=f"test-docker-control-{uuid.uuid4().hex[:8]}",
            installation="test-control",
            scratch_dir=tmp_path / "control",
        )
        spec = WorkspaceSpec(
            run_id=uuid.uuid4(), request_id=uuid.uuid4(), repo=str(git_repo), ref=None
        )
        workspace = await provisioner.provision(spec)
        control: list[str] = []

        async def keep(stream: str, line: str) -> None:
            control.append(f"[{stream}] {line}")

        try:
            path = await workspace.write_scratch("control.sh", script)
            code = await workspace.exec(["bash", path], env={}, on_line=keep, timeout_s=30)
        finally:
            await workspace.close()
        assert code == 0 and "[stdout] connected" in control, control

        async with deploy() as fl:  # network off: the default
            run_id = await fl.submit(git_repo, script)
            run = await fl.wait_terminal(run_id, timeout=60)
            log = await fl.log(run_id)
            print(f"\nnetwork off: {stderr_of(log)!r}")
            assert run.status is RunStatus.FAILED, report(run, log)
            assert run.error is not None and run.error["code"] == FailureCode.AGENT_FAILED
            assert run.exit_code == 1, report(run, log)
            assert "connect failed: [Errno 101] Network is unreachable" in stderr_of(log)
            assert "connected" not in stdout_of(log)
            await fl.wait_no_container(run_id)
    finally:
        listener.close()


# -- 5. what the workspace does not see -----------------------------------------------------


async def test_host_paths_and_the_docker_socket_are_not_visible_inside(
    deploy: Callable[..., Any], git_repo: Path
) -> None:
    script = (
        f"test -e {git_repo} && echo 'host repo: visible' || echo 'host repo: absent'\n"
        "test -e /var/run/docker.sock && echo 'socket: visible' || echo 'socket: absent'\n"
        "test -e /run/docker.sock && echo 'run socket: visible' || echo 'run socket: absent'\n"
        'echo "pwd=$(pwd)"\n'
        'echo "toplevel=$(git rev-parse --show-toplevel)"\n'
        "grep CapEff /proc/self/status\n"
        "test -f README.md && test -f src/hello.py && echo 'files: present'\n"
    )
    async with deploy() as fl:
        run_id = await fl.submit(git_repo, script)
        run = await fl.wait_terminal(run_id, timeout=60)
        log = await fl.log(run_id)
        assert run.status is RunStatus.SUCCEEDED, report(run, log)
        out = stdout_of(log)
        assert "host repo: absent" in out, report(run, log)
        assert "socket: absent" in out, report(run, log)
        assert "run socket: absent" in out, report(run, log)
        assert "pwd=/workspace" in out, report(run, log)
        assert "toplevel=/workspace" in out, report(run, log)
        assert "CapEff:\t0000000000000000" in out, report(run, log)
        assert "files: present" in out, report(run, log)
        assert run.patch is None  # looking around changes nothing
        await fl.wait_no_container(run_id)


# -- 6. cancel ------------------------------------------------------------------------------


async def test_cancel_stops_the_agent_and_removes_the_container(
    deploy: Callable[..., Any], git_repo: Path
) -> None:
    async with deploy() as fl:
        run_id = await fl.submit(git_repo, "echo started\nsleep 60\necho finished\n")
        await fl.wait_log_line(run_id, "started")
        assert await fl.containers_of(run_id)
        asked = time.monotonic()
        await fl.cancel(run_id)
        run = await fl.wait_terminal(run_id, timeout=10)
        took = time.monotonic() - asked
        log = await fl.log(run_id)
        print(f"\ncancelled {took:.2f} s after the cancel was published")
        assert run.status is RunStatus.CANCELLED, report(run, log)
        assert took < 5, report(run, log)
        assert "finished" not in stdout_of(log)
        await fl.wait_no_container(run_id)


# -- 8. the reaper --------------------------------------------------------------------------


async def test_reaper_removes_orphans_and_keeps_active_runs_and_foreign_containers(
    deploy: Callable[..., Any], docker: aiodocker.Docker, image: str, git_repo: Path
) -> None:
    tag = uuid.uuid4().hex
    orphan_run = uuid.uuid4()  # a run this store never heard of

    async def plant(labels: dict[str, str]) -> str:
        container = await docker.containers.create(
            {
                "Image": image,
                "Cmd": ["sleep", "infinity"],
                "Labels": {LABEL_TEST: tag, **labels},
                "NetworkDisabled": True,
                "HostConfig": {"NetworkMode": "none", "Init": True},
            }
        )
        await container.start()
        return str(container.id)

    try:
        async with deploy() as fl:
            run_id = await fl.submit(git_repo, "echo started\nsleep 60\n")
            await fl.wait_log_line(run_id, "started")
            [active] = await fl.containers_of(run_id)
            ours = {LABEL_MANAGED: "true", LABEL_INSTALLATION: fl.installation}
            orphan = await plant({**ours, LABEL_RUN: str(orphan_run)})
            unlabelled = await plant(ours)  # no run id: ours, unowned
            foreign = await plant({"com.example.app": "not-forgeline"})

            removed = await fl.workspaces().reap_once()

            assert orphan in removed and unlabelled in removed
            assert str(active.id) not in removed and foreign not in removed
            left = {str(c.id) for c in await containers(docker, f"{LABEL_TEST}={tag}")}
            assert left == {foreign}
            assert [str(c.id) for c in await fl.containers_of(run_id)] == [str(active.id)]
            assert (await fl.run(run_id)).status is RunStatus.RUNNING

            await fl.cancel(run_id)
            assert (await fl.wait_terminal(run_id, 10)).status is RunStatus.CANCELLED
            await fl.wait_no_container(run_id)
    finally:
        await remove_all(docker, f"{LABEL_TEST}={tag}")


async def test_reaper_of_another_deployment_keeps_this_ones_running_workspace(
    deploy: Callable[..., Any], pg_server: Any, git_repo: Path
) -> None:
    other_db = f"t_other_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other_db)))
    other_app = await asyncio.to_thread(open_store, pg_server.url(other_db))
    try:
        async with deploy() as fl:
            run_id = await fl.submit(git_repo, "echo started\nsleep 60\necho finished\n")
            await fl.wait_log_line(run_id, "started")
            other = Workspaces(
                provisioner=None,  # type: ignore[arg-type]
                description="another deployment's reaper",
                isolated=True,
                _docker=fl.docker,
                _app=other_app,
                _installation=installation_id(pg_server.url(other_db)),
            )
            removed = await other.reap_once()  # what its worker does when it starts
            try:
                assert not removed, "another deployment's reaper removed this run's container"
                assert (await fl.run(run_id)).status is RunStatus.RUNNING
            finally:
                await fl.cancel(run_id)
                await fl.wait_terminal(run_id, 15)
    finally:
        await asyncio.to_thread(other_app.close)
        with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(other_db)))


# -- 7. the engine restarts (last: it stops every container on the engine) -----------------
#
# One restart serves three tests (module-scoped fixture): run A is mid-run when dockerd stops;
# run B is submitted while the engine is down and its first provisioning attempt has failed;
# then dockerd starts again as it was started before.


def dockerd_pid() -> int | None:
    found = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout
    pids = [int(pid) for pid in found.split()]
    return pids[0] if len(pids) == 1 else None


def managed_by_systemd(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "docker.service" in Path(f"/proc/{pid}/cgroup").read_text()
    return False


@dataclass(frozen=True)
class Dockerd:
    """How the running dockerd was started, to start it again the same way."""

    pid: int
    argv: list[str]
    cwd: str
    env: dict[str, str]

    @classmethod
    def running(cls) -> Dockerd | None:
        pid = dockerd_pid()
        if pid is None or os.geteuid() != 0 or managed_by_systemd(pid):
            return None
        proc = Path(f"/proc/{pid}")
        argv = [a for a in (proc / "cmdline").read_bytes().decode().split("\0") if a]
        environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
        env = dict(e.split("=", 1) for e in environ if "=" in e)
        env = {k: v for k, v in env.items() if not k.startswith("PYTEST_")}
        exe = os.readlink(proc / "exe")  # argv[0] may rely on a PATH we do not have
        return cls(pid, [exe, *argv[1:]], os.readlink(proc / "cwd"), env)

    def start(self) -> None:
        """nohup <cmdline> >>log 2>&1 &, from a shell that exits at once (no child of ours)."""
        subprocess.run(
            ["sh", "-c", f'nohup "$@" >>{DOCKERD_LOG} 2>&1 </dev/null &', "sh", *self.argv],
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,
            check=True,
            timeout=10,
        )


@dataclass
class RestartOutcome:
    mid_run: Run  # running `sleep` when dockerd stopped
    mid_run_log: list[tuple[str, str]]
    while_down: Run  # submitted while the engine was down
    while_down_log: list[tuple[str, str]]
    leaked: list[str]  # containers of either run left after the reaper ran


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    (path / "README.md").write_text("# Sample\n")
    git(path, "add", "README.md")
    git(
        path,
        *("-c", "user.name=Forgeline Tests", "-c", "user.email=tests@forgeline.invalid"),
        *("commit", "--quiet", "-m", "Add README"),
    )
    return path


@pytest.fixture(scope="module")
async def engine_restart(
    pg_server: Any,
    docker: aiodocker.Docker,
    image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RestartOutcome]:
    dockerd = Dockerd.running()
    if dockerd is None:
        pytest.skip("needs root and a single dockerd (not systemd's) to stop and start again")
    tmp = tmp_path_factory.mktemp("engine-restart")
    repo = make_repo(tmp / "repo")
    nats = start_nats(tmp / "nats")
    database = f"t_restart_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        async with deployment(nats.url, pg_server.url(database), tmp / "data", docker, image) as fl:
            mid_run = await fl.submit(repo, "echo started\nsleep 20\necho finished\n")
            await fl.wait_log_line(mid_run, "started")

            os.kill(dockerd.pid, signal.SIGTERM)
            stopped = time.monotonic()
            await eventually(
                lambda: not Path(f"/proc/{dockerd.pid}").exists(),
                timeout=30,
                message="dockerd to exit",
            )
            assert not await engine_answers(docker)

            while_down = await fl.submit(repo, "echo provisioned\n")

            async def first_attempt_failed() -> bool:
                if (await fl.run(while_down)).is_terminal:
                    return True
                log = await fl.log(while_down)
                return any("handing the run back" in line for _, line in log)

            await eventually(first_attempt_failed, timeout=30, message="a provisioning attempt")
            dockerd.start()
            await eventually(
                lambda: engine_answers(docker), timeout=60, message="dockerd to answer again"
            )
            print(f"\nengine back {time.monotonic() - stopped:.1f} s after SIGTERM")

            ended = {}
            for run_id in (mid_run, while_down):
                ended[run_id] = await fl.wait_terminal(run_id, timeout=60)
                print(f"run after the restart: {ended[run_id].status} {ended[run_id].error}")
            await fl.workspaces().reap_once()

            async def leftovers() -> list[str]:
                runs = (mid_run, while_down)
                return [str(c.id) for r in runs for c in await fl.containers_of(r)]

            # A removal the engine already has in progress finishes on its own time.
            with contextlib.suppress(AssertionError):
                await eventually(
                    lambda: _none(leftovers()), timeout=20, message="no leftover container"
                )
            leaked = await leftovers()
            yield RestartOutcome(
                ended[mid_run],
                await fl.log(mid_run),
                ended[while_down],
                await fl.log(while_down),
                leaked,
            )
    finally:
        if not await engine_answers(docker):
            if dockerd_pid() is None:
                dockerd.start()
            await eventually(lambda: engine_answers(docker), timeout=60, message="dockerd")
        nats.stop()
        with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(database)))


async def test_engine_restart_ends_every_run_and_leaks_no_container(
    engine_restart: RestartOutcome, docker: aiodocker.Docker
) -> None:
    outcome = engine_restart  # the fixture waited (60 s each) for both runs to end
    for run, log in (
        (outcome.mid_run, outcome.mid_run_log),
        (outcome.while_down, outcome.while_down_log),
    ):
        assert run.status in (RunStatus.FAILED, RunStatus.SUCCEEDED), report(run, log)
    assert outcome.leaked == []
    assert await engine_answers(docker)


async def test_run_broken_by_the_engine_restart_fails_as_a_workspace_failure(
    engine_restart: RestartOutcome,
) -> None:
    run, log = engine_restart.mid_run, engine_restart.mid_run_log
    if run.status is RunStatus.FAILED:
        assert run.error is not None
        assert run.error["code"] in (
            FailureCode.WORKSPACE_FAILED,
            FailureCode.WORKSPACE_UNAVAILABLE,
        ), report(run, log)


async def test_run_submitted_while_the_engine_is_down_is_retried_until_it_answers(
    engine_restart: RestartOutcome,
) -> None:
    run, log = engine_restart.while_down, engine_restart.while_down_log
    assert run.status is RunStatus.SUCCEEDED, report(run, log)
    assert ("stdout", "provisioned") in log


async def _none(items: Any) -> bool:
    return not await items

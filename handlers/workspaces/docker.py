"""The `docker` provisioner: one container per run, on aiodocker.

The repository is cloned on the worker's host and copied into the container (put_archive),
never bind-mounted. The container runs as the non-root user `agent`, with CPU, memory and pids
limits, no network unless allowed, no Docker socket, all capabilities dropped. The agent runs
through exec with its output streamed line by line; the patch is taken inside the container;
the container is removed when the run ends, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import shutil
import tarfile
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer

from handlers.workspaces.base import (
    AgentTimedOut,
    LineSink,
    WorkspaceError,
    WorkspaceSpec,
    WorkspaceUnavailable,
)
from handlers.workspaces.git import checkout

log = logging.getLogger(__name__)

LABEL_MANAGED = "org.forgeline.managed"
LABEL_RUN = "org.forgeline.run_id"
LABEL_REQUEST = "org.forgeline.request_id"
LABEL_WORKER = "org.forgeline.worker"
AGENT_UID = 1000
WORKDIR = "/workspace"
HOME = "/home/agent"
SCRATCH = f"{HOME}/.forgeline"  # outside the repository: never part of the patch
CALL_TIMEOUT_S = 30.0  # every Docker API call; a hung engine must not hang a run
_KILL_GRACE_S = 2.0
_PID_FILE = "/tmp/.forgeline-agent.pid"


@dataclass(frozen=True)
class ContainerLimits:
    cpus: float = 2.0
    memory_mb: int = 2048
    pids: int = 512
    network: bool = False


class DockerWorkspace:
    def __init__(self, container: DockerContainer, base_commit: str) -> None:
        self._container = container
        self._base_commit = base_commit
        self._numstat: str | None = None
        self._closed = False

    @property
    def base_commit(self) -> str:
        return self._base_commit

    @property
    def container_id(self) -> str:
        return str(self._container.id)

    async def write_scratch(self, name: str, content: str) -> str:
        data = _tar({f".forgeline/{name}": content.encode()}, mode=0o600)
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await self._container.put_archive(HOME, data)  # type: ignore[no-untyped-call]
        return f"{SCRATCH}/{name}"

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        on_line: LineSink,
        timeout_s: float,
    ) -> int:
        # setsid makes the agent a process-group leader, so a kill reaches all it started.
        wrapped = [
            "setsid",
            "-w",
            "/bin/sh",
            "-c",
            f'echo $$ > {_PID_FILE}; exec "$@"',
            "sh",
            *argv,
        ]
        full_env = {"HOME": HOME, **env}
        try:
            async with asyncio.timeout(timeout_s):
                return await self._run(wrapped, full_env, on_line)
        except TimeoutError:
            await self._kill_agent()
            raise AgentTimedOut(f"agent still running after {timeout_s:g} s; killed") from None
        except asyncio.CancelledError:
            await asyncio.shield(self._kill_agent())
            raise

    async def _run(self, argv: Sequence[str], env: Mapping[str, str], on_line: LineSink) -> int:
        execution = await self._container.exec(
            list(argv), user=str(AGENT_UID), environment=dict(env), workdir=WORKDIR
        )
        buffers = {1: bytearray(), 2: bytearray()}
        async with execution.start(detach=False) as stream:
            while (message := await stream.read_out()) is not None:
                buffer = buffers.get(message.stream, buffers[1])
                buffer.extend(message.data)
                *lines, tail = bytes(buffer).split(b"\n")
                buffer[:] = tail
                for line in lines:
                    await _emit(on_line, message.stream, line)
        for stream_no, leftover in buffers.items():
            if leftover:
                await _emit(on_line, stream_no, bytes(leftover))
        return await _exit_code(execution)

    async def _kill_agent(self) -> None:
        """TERM, then KILL, to the agent's whole process group; the container stays for the diff."""
        for signal_name, wait in (("TERM", _KILL_GRACE_S), ("KILL", 0.0)):
            with contextlib.suppress(Exception):
                await self.output(
                    ["sh", "-c", f"kill -{signal_name} -- -$(cat {_PID_FILE}) 2>/dev/null"]
                )
            await asyncio.sleep(wait)

    async def output(self, argv: Sequence[str]) -> tuple[int, bytes]:
        """Runs a short command as the agent user; returns (exit code, stdout)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            execution = await self._container.exec(
                list(argv), user=str(AGENT_UID), workdir=WORKDIR, stderr=False
            )
            out = bytearray()
            async with execution.start(detach=False) as stream:
                while (chunk := await stream.read_out()) is not None:
                    out.extend(chunk.data)
            return await _exit_code(execution), bytes(out)

    async def diff(self) -> str:
        # One exec instead of three: each costs about 100 ms on the engine.
        base = self._base_commit
        code, out = await self.output(
            [
                "sh",
                "-c",
                f"git add -A && git diff --cached --numstat {base} && printf '\\0'"
                f" && git diff --cached --binary {base}",
            ]
        )
        if code != 0:
            raise WorkspaceError(f"git diff failed in the container (exit {code})")
        numstat, _, diff = out.partition(b"\0")
        self._numstat = numstat.decode(errors="replace")
        return diff.decode(errors="replace")

    async def numstat(self) -> str:
        """The numstat taken together with the last diff()."""
        if self._numstat is None:
            await self.diff()
        assert self._numstat is not None
        return self._numstat

    async def describe_exit(self, exit_code: int) -> str | None:
        if exit_code != 137:  # 128 + SIGKILL: what the kernel's OOM killer leaves
            return None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CALL_TIMEOUT_S):
                info = await self._container.show()
            if info.get("State", {}).get("OOMKilled"):
                limit = info.get("HostConfig", {}).get("Memory", 0) // (1024 * 1024)
                return f"the agent ran out of memory (workspace limit {limit} MiB)"
        return "the agent was killed (SIGKILL); the workspace may have run out of memory"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await remove_container(self._container)


class DockerProvisioner:
    name = "docker"

    def __init__(
        self,
        docker: aiodocker.Docker,
        image: str,
        limits: ContainerLimits,
        *,
        worker: str,
        scratch_dir: Path,
    ) -> None:
        self._docker = docker
        self._image = image
        self._limits = limits
        self._worker = worker
        self._scratch_dir = scratch_dir

    async def provision(self, spec: WorkspaceSpec) -> DockerWorkspace:
        # The clone on the host and the container's start overlap: both take a while.
        started = asyncio.create_task(self._start_container(spec))
        try:
            base_commit, archive = await self._clone_to_archive(spec)
            container = await started
        except BaseException:
            started.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(_remove_if_started(started))
            raise
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await container.put_archive(WORKDIR, archive)  # type: ignore[no-untyped-call]
        except BaseException as exc:
            await asyncio.shield(remove_container(container))
            if isinstance(exc, aiodocker.DockerError):
                raise WorkspaceError(f"cannot copy the repository in: {exc}") from exc
            raise _unavailable_or(exc) from exc
        return DockerWorkspace(container, base_commit)

    async def _clone_to_archive(self, spec: WorkspaceSpec) -> tuple[str, bytes]:
        source = Path(tempfile.mkdtemp(prefix=f"{spec.run_id}-", dir=self._ensure_scratch()))
        try:
            base_commit = await checkout(source / "repo", spec)
            return base_commit, await asyncio.to_thread(_tar_tree, source / "repo")
        finally:
            await asyncio.to_thread(shutil.rmtree, source, True)

    async def _start_container(self, spec: WorkspaceSpec) -> DockerContainer:
        container = await self._create(spec)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await container.start()
        except BaseException as exc:
            # A container that failed to start is deleted (never leaked).
            await asyncio.shield(remove_container(container))
            if isinstance(exc, aiodocker.DockerError):
                raise WorkspaceError(f"the workspace container failed to start: {exc}") from exc
            raise _unavailable_or(exc) from exc
        return container

    def _ensure_scratch(self) -> Path:
        self._scratch_dir.mkdir(parents=True, exist_ok=True)
        return self._scratch_dir

    async def _create(self, spec: WorkspaceSpec) -> DockerContainer:
        config = container_config(self._image, self._limits, spec, self._worker)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                return await self._docker.containers.create(config)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise WorkspaceError(
                    f"workspace image {self._image!r} is missing; run `forgeline image build`"
                ) from exc
            raise WorkspaceError(f"cannot create the workspace container: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _unavailable_or(exc) from exc


def container_config(
    image: str, limits: ContainerLimits, spec: WorkspaceSpec, worker: str
) -> dict[str, Any]:
    memory = limits.memory_mb * 1024 * 1024
    return {
        "Image": image,
        "Cmd": ["sleep", "infinity"],
        "User": f"{AGENT_UID}:{AGENT_UID}",
        "WorkingDir": WORKDIR,
        "Env": [f"HOME={HOME}", "LANG=C.UTF-8"],
        "Labels": {
            LABEL_MANAGED: "true",
            LABEL_RUN: str(spec.run_id),
            LABEL_REQUEST: str(spec.request_id),
            LABEL_WORKER: worker,
        },
        "NetworkDisabled": not limits.network,
        "HostConfig": {
            "NanoCpus": int(limits.cpus * 1e9),
            "Memory": memory,
            "MemorySwap": memory,  # no swap: the limit is the limit
            "PidsLimit": limits.pids,
            "NetworkMode": "bridge" if limits.network else "none",
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Init": True,
            "AutoRemove": False,
        },
    }


async def remove_container(container: DockerContainer) -> None:
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await container.delete(force=True, v=True)
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            log.warning("could not remove container %s: %s", container.id, exc)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.warning("could not remove container %s: %s (the reaper will)", container.id, exc)


async def reap(docker: aiodocker.Docker, keep: Callable[[UUID], Awaitable[bool]]) -> list[str]:
    """Removes Forgeline's containers whose run `keep` does not vouch for; returns their ids."""
    async with asyncio.timeout(CALL_TIMEOUT_S):
        containers = await docker.containers.list(
            all=True, filters=f'{{"label": ["{LABEL_MANAGED}=true"]}}'
        )
    removed = []
    for container in containers:
        labels = container._container.get("Labels") or {}
        try:
            run_id = UUID(labels.get(LABEL_RUN, ""))
        except ValueError:
            run_id = None
        if run_id is not None and await keep(run_id):
            continue
        await remove_container(container)
        removed.append(str(container.id))
    return removed


async def _remove_if_started(started: asyncio.Task[DockerContainer]) -> None:
    """Waits for a container start that was abandoned, and removes what it made."""
    with contextlib.suppress(BaseException):
        container = await started
        await remove_container(container)


def _unavailable_or(exc: BaseException) -> BaseException:
    if isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
        return WorkspaceUnavailable(f"the Docker engine does not answer: {exc or type(exc)}")
    return exc


async def _emit(on_line: LineSink, stream_no: int, raw: bytes) -> None:
    line = raw.decode(errors="replace").rstrip("\r")
    await on_line("stderr" if stream_no == 2 else "stdout", line)


async def _exit_code(execution: Any) -> int:
    """Exec exit codes appear once Running turns false (aiodocker pitfall)."""
    while True:
        info = await execution.inspect()
        if not info.get("Running"):
            code = info.get("ExitCode")
            return int(code) if code is not None else -1
        await asyncio.sleep(0.02)


def _tar(files: Mapping[str, bytes], *, mode: int = 0o644) -> bytes:
    """Files (and their folders) owned by the agent user."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folders = sorted({str(Path(name).parent) for name in files} - {"."})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            info.uid = info.gid = AGENT_UID
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            info.uid = info.gid = AGENT_UID
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _tar_tree(root: Path) -> bytes:
    """The checked-out repository (with .git) as a tar owned by the agent user."""

    def owned_by_agent(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = AGENT_UID
        info.uname = info.gname = "agent"
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(root, arcname=".", filter=owned_by_agent)
    return buffer.getvalue()

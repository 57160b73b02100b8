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
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import aiodocker
from aiodocker.containers import DockerContainer

from handlers.workspaces.base import (
    AgentTimedOut,
    LineSink,
    WorkspaceDiff,
    WorkspaceError,
    WorkspaceSpec,
    WorkspaceUnavailable,
)
from handlers.workspaces.docker_engine import (
    AGENT_UID,
    LABEL_INSTALLATION,
    LABEL_MANAGED,
    LABEL_REQUEST,
    LABEL_RUN,
    LABEL_WORKER,
    engine_call,
    remove_container,
    tar_files,
    tar_tree,
)
from handlers.workspaces.git import DIFF_ARGV, checkout, diff_from_output, patch_of
from handlers.workspaces.llm_link import isolate, start_forwarder

WORKDIR = "/workspace"
HOME = "/home/agent"
SCRATCH = f"{HOME}/.forgeline"  # outside the repository: never part of the patch


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
        self._closed = False

    @property
    def base_commit(self) -> str:
        return self._base_commit

    @property
    def container_id(self) -> str:
        return str(self._container.id)

    async def write_scratch(self, name: str, content: str) -> str:
        data = tar_files({f".forgeline/{name}": content.encode()}, mode=0o600)
        async with engine_call("writing the prompt into the workspace"):
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
        try:
            async with asyncio.timeout(timeout_s):
                return await self._run(argv, {"HOME": HOME, **env}, on_line)
        except TimeoutError:
            await self._stop_everything()
            raise AgentTimedOut(f"agent still running after {timeout_s:g} s; killed") from None
        # On cancellation, close() removes the container and everything running in it.

    async def _run(self, argv: Sequence[str], env: Mapping[str, str], on_line: LineSink) -> int:
        async with engine_call("starting the agent"):
            execution = await self._container.exec(
                list(argv), user=str(AGENT_UID), environment=dict(env), workdir=WORKDIR
            )
        buffers = {1: bytearray(), 2: bytearray()}
        async with engine_call("reading the agent's output", timeout_s=None):
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

    async def stop_agent(self) -> None:
        await self._stop_everything()

    async def _stop_everything(self) -> None:
        """Kills every process in the container and starts it again empty, keeping its files:
        a kill from inside needs a free pid, which an agent at the pids limit leaves none of."""
        async with engine_call("stopping the agent"):
            await self._container.restart(t=0)

    async def output(self, argv: Sequence[str]) -> tuple[int, bytes]:
        """Runs a short command as the agent user; returns (exit code, stdout)."""
        async with engine_call(f"running {argv[0]} in the workspace"):
            execution = await self._container.exec(
                list(argv), user=str(AGENT_UID), workdir=WORKDIR, stderr=False
            )
            out = bytearray()
            async with execution.start(detach=False) as stream:
                while (chunk := await stream.read_out()) is not None:
                    out.extend(chunk.data)
        return await _exit_code(execution), bytes(out)

    async def diff(self) -> WorkspaceDiff:
        # One exec in the common case (each costs about 100 ms on the engine); the careful
        # path of patch_of only when the diff is not storable text.
        base = self._base_commit
        code, out = await self.output([*DIFF_ARGV, base])
        if code in (126, 137):  # could not start, or killed: the container is stopping
            raise WorkspaceUnavailable(f"git diff could not run in the container (exit {code})")
        if code != 0:
            raise WorkspaceError(f"git diff failed in the container (exit {code})")
        found = diff_from_output(out)
        if found is None:
            found = await patch_of(self._git_bytes, self.write_scratch, base)
        return found

    async def _git_bytes(self, *args: str) -> bytes:
        code, out = await self.output(["git", *args])
        if code != 0:
            raise WorkspaceError(f"git {args[0]} failed in the container (exit {code})")
        return out

    async def describe_exit(self, exit_code: int) -> str | None:
        if exit_code != 137:  # 128 + SIGKILL: what the kernel's OOM killer leaves
            return None
        with contextlib.suppress(WorkspaceError):
            async with engine_call("inspecting the workspace"):
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
        installation: str,
        scratch_dir: Path,
        llm_socket_dir: Path | None = None,
    ) -> None:
        self._docker = docker
        self._llm_socket_dir = llm_socket_dir  # the LLM proxy's socket folder (llm_link.py)
        self._image = image
        self._limits = limits
        self._labels = {LABEL_WORKER: worker, LABEL_INSTALLATION: installation}
        self._installation = installation
        self._scratch_dir = scratch_dir

    async def close(self) -> None:
        pass  # a workspace removes its container when it closes; the engine client is the caller's

    async def ping(self) -> None:
        """Raises WorkspaceUnavailable unless the engine answers (the breaker's probe)."""
        async with engine_call("asking the engine for its version", timeout_s=5.0):
            await self._docker.version()

    async def discard(self, run_id: UUID) -> None:
        """Removes the containers of this run, whichever worker made them (recovery of a run
        whose worker died: its agent must not write on)."""
        label_filter = json.dumps(
            {"label": [f"{LABEL_RUN}={run_id}", f"{LABEL_INSTALLATION}={self._installation}"]}
        )
        async with engine_call("listing the run's workspace containers"):
            containers = await self._docker.containers.list(all=True, filters=label_filter)
        for container in containers:
            await remove_container(container)

    async def provision(self, spec: WorkspaceSpec) -> DockerWorkspace:
        # The clone on the host and the container's start overlap: both take a while.
        started = asyncio.create_task(self._start_container(spec))
        try:
            base_commit, archive = await self._clone_to_archive(spec)
            container = await started
        except BaseException:
            started.cancel()
            await asyncio.shield(_remove_if_started(started))
            raise
        try:
            async with engine_call("copying the repository into the workspace"):
                await container.put_archive(WORKDIR, archive)  # type: ignore[no-untyped-call]
        except BaseException:
            await asyncio.shield(remove_container(container))
            raise
        return DockerWorkspace(container, base_commit)

    async def _clone_to_archive(self, spec: WorkspaceSpec) -> tuple[str, bytes]:
        self._scratch_dir.mkdir(parents=True, exist_ok=True)
        source = Path(tempfile.mkdtemp(prefix=f"{spec.run_id}-", dir=self._scratch_dir))
        try:
            base_commit = await checkout(source / "repo", spec)
            return base_commit, await asyncio.to_thread(tar_tree, source / "repo")
        finally:
            await asyncio.to_thread(shutil.rmtree, source, True)

    async def _start_container(self, spec: WorkspaceSpec) -> DockerContainer:
        config = container_config(self._image, self._limits, spec, self._labels)
        if spec.llm_proxy:
            config = isolate(config, self._llm_socket_dir)
        try:
            async with engine_call("creating the workspace container"):
                container = await self._docker.containers.create(config)
        except WorkspaceError as exc:
            cause = exc.__cause__
            if isinstance(cause, aiodocker.DockerError) and cause.status == 404:
                raise WorkspaceError(
                    f"workspace image {self._image!r} is missing; run `forgeline image build`"
                ) from cause
            raise
        try:
            async with engine_call("starting the workspace container"):
                await container.start()
            if spec.llm_proxy:  # while the repository is cloned on the host
                await start_forwarder(container)
        except BaseException:
            # A container that failed to start is deleted, never leaked.
            await asyncio.shield(remove_container(container))
            raise
        return container


def container_config(
    image: str, limits: ContainerLimits, spec: WorkspaceSpec, labels: Mapping[str, str]
) -> dict[str, Any]:
    memory = limits.memory_mb * 1024 * 1024
    return {
        "Image": image,
        "Cmd": ["sleep", "infinity"],
        "User": f"{AGENT_UID}:{AGENT_UID}",
        "WorkingDir": WORKDIR,
        "Env": [f"HOME={HOME}", "LANG=C.UTF-8"],
        "Labels": {
            **labels,
            LABEL_MANAGED: "true",
            LABEL_RUN: str(spec.run_id),
            LABEL_REQUEST: str(spec.request_id),
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


async def _remove_if_started(started: asyncio.Task[DockerContainer]) -> None:
    """Waits for a container start that was abandoned, and removes what it made."""
    with contextlib.suppress(BaseException):
        await remove_container(await started)


async def _emit(on_line: LineSink, stream_no: int, raw: bytes) -> None:
    line = raw.decode(errors="replace").rstrip("\r")
    await on_line("stderr" if stream_no == 2 else "stdout", line)


async def _exit_code(execution: Any) -> int:
    """Exec exit codes appear once Running turns false (aiodocker pitfall)."""
    while True:
        async with engine_call("reading the agent's exit code"):
            info = await execution.inspect()
        if not info.get("Running"):
            code = info.get("ExitCode")
            return int(code) if code is not None else -1
        await asyncio.sleep(0.02)

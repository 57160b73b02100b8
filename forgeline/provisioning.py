"""Choosing the workspace provisioner: Docker when an engine answers, else local (loudly)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import aiodocker
import anyio
from eventsourcing.application import AggregateNotFoundError

from domain.application import Forgeline
from forgeline.settings import Settings
from forgeline.startup import StartupError
from handlers.workspaces.base import Provisioner
from handlers.workspaces.disk import prepare_workspaces_dir
from handlers.workspaces.docker import ContainerLimits, DockerProvisioner
from handlers.workspaces.docker_engine import reap
from handlers.workspaces.local import LocalProvisioner

log = logging.getLogger("forgeline")

ENGINE_PROBE_TIMEOUT_S = 5.0
REAP_INTERVAL_S = 60.0


class DockerRequired(StartupError):
    """FORGELINE_PROVISIONER=docker, but no Docker engine answers."""


@dataclass
class Workspaces:
    provisioner: Provisioner
    description: str
    isolated: bool
    _docker: aiodocker.Docker | None = None
    _app: Forgeline | None = None
    _installation: str = ""
    _reaped: list[str] = field(default_factory=list)

    async def reap_forever(self, stop: asyncio.Event) -> None:
        """Removes containers of runs that ended or that the store does not know, every minute."""
        while not stop.is_set() and self._docker is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REAP_INTERVAL_S)
            if not stop.is_set():
                await self.reap_once()

    async def reap_once(self) -> list[str]:
        if self._docker is None or self._app is None:
            return []
        app = self._app

        async def run_is_active(run_id: UUID) -> bool:
            def active() -> bool:
                try:
                    return not app.get_run(run_id).is_terminal
                except (AggregateNotFoundError, AssertionError):
                    return False

            return await anyio.to_thread.run_sync(active)

        try:
            removed = await reap(self._docker, self._installation, run_is_active)
        except Exception as exc:  # the engine may be down; the next round tries again
            log.warning("reaper: %s", exc)
            return []
        if removed:
            log.info("reaper: removed %d leftover workspace container(s)", len(removed))
        return removed

    async def close(self) -> None:
        await self.provisioner.close()
        if self._docker is not None:
            await self._docker.close()


async def open_workspaces(
    settings: Settings,
    app: Forgeline,
    installation: str,
    progress: Callable[[str], None] = log.info,
    llm_socket_dir: Path | None = None,
) -> Workspaces:
    """llm_socket_dir: the LLM proxy's socket folder, mounted into LLM agents' workspaces."""
    prepare_workspaces_dir(settings.workspaces_dir)  # spread over the disk: see its module
    if settings.provisioner in ("auto", "docker"):
        docker = await _engine(settings)
        if docker is not None:
            return await _docker_workspaces(
                settings, app, installation, docker, progress, llm_socket_dir
            )
        if settings.provisioner == "docker":
            raise DockerRequired(
                "FORGELINE_PROVISIONER=docker but no Docker engine answers at "
                f"{settings.docker_url or 'the default socket'}: start dockerd "
                "(scripts/ensure-docker.sh) or set FORGELINE_PROVISIONER=local"
            )
        log.warning(
            "no Docker engine answers: falling back to LOCAL workspaces, which do not isolate "
            "agents from this host (set FORGELINE_PROVISIONER=docker to refuse instead)"
        )
    local = LocalProvisioner(settings.workspaces_dir)
    local.reap()
    return Workspaces(local, "local (NOT isolated: agents run as this user)", isolated=False)


async def _engine(settings: Settings) -> aiodocker.Docker | None:
    try:
        docker = aiodocker.Docker(url=settings.docker_url)
    except Exception as exc:  # no socket at all
        log.info("no Docker engine: %s", exc)
        return None
    try:
        async with asyncio.timeout(ENGINE_PROBE_TIMEOUT_S):
            await docker.version()
    except Exception as exc:
        log.info("no Docker engine answers: %s", exc)
        await docker.close()
        return None
    return docker


async def _docker_workspaces(
    settings: Settings,
    app: Forgeline,
    installation: str,
    docker: aiodocker.Docker,
    progress: Callable[[str], None],
    llm_socket_dir: Path | None = None,
) -> Workspaces:
    from forgeline.image_commands import cache_dir
    from handlers.workspaces.image import ensure_image  # only where Docker is used

    try:
        image = await ensure_image(
            docker,
            settings.workspace_image,
            mirror=settings.debian_mirror,
            progress=progress,
            cache_dir=cache_dir(settings),
        )
    except BaseException:
        await docker.close()
        raise
    limits = ContainerLimits(
        cpus=settings.workspace_cpus,
        memory_mb=settings.workspace_memory_mb,
        pids=settings.workspace_pids,
        network=settings.workspace_network,
    )
    provisioner = DockerProvisioner(
        docker,
        image,
        limits,
        worker=settings.worker_name,
        installation=installation,
        scratch_dir=settings.workspaces_dir,
        llm_socket_dir=llm_socket_dir,
    )
    workspaces = Workspaces(
        provisioner,
        f"docker (image {image}, {limits.cpus:g} CPU, {limits.memory_mb} MiB, "
        f"{limits.pids} pids, network {'on' if limits.network else 'off'})",
        isolated=True,
        _docker=docker,
        _app=app,
        _installation=installation,
    )
    await workspaces.reap_once()
    return workspaces

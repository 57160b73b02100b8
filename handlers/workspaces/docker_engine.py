"""Talking to the Docker engine: every call under a timeout, every failure mapped to the
workspace errors the executor understands, and the reaper of leftover containers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from uuid import UUID

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer

from handlers.workspaces.base import WorkspaceError, WorkspaceUnavailable

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0  # every Docker API call; a hung engine must not hang a run
AGENT_UID = 1000
LABEL_MANAGED = "org.forgeline.managed"
LABEL_INSTALLATION = "org.forgeline.installation"  # which event store the run lives in
LABEL_RUN = "org.forgeline.run_id"
LABEL_REQUEST = "org.forgeline.request_id"
LABEL_WORKER = "org.forgeline.worker"
_CANNOT_CONNECT = 900  # aiodocker's status for "the engine did not answer"


def _engine_went_away(exc: aiodocker.DockerError) -> bool:
    """The container stopped under the run, or the engine is shutting down: what an engine
    restart does (the fault suite's dockerd restart saw both), not the agent or the request."""
    message = str(exc.message)
    return "is not running" in message or (
        exc.status >= 500
        and ("connection is closing" in message or "transport is closing" in message)
    )


@contextlib.asynccontextmanager
async def engine_call(what: str, timeout_s: float | None = CALL_TIMEOUT_S) -> AsyncIterator[None]:
    """Maps an engine that does not answer to WorkspaceUnavailable (worth retrying) and an
    engine that refuses to WorkspaceError, naming what was being done."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except aiodocker.DockerError as exc:
        if exc.status == _CANNOT_CONNECT:
            raise WorkspaceUnavailable(f"the Docker engine does not answer ({what})") from exc
        if _engine_went_away(exc):
            why = f"the Docker engine restarted under the run ({what})"
            raise WorkspaceUnavailable(why) from exc
        raise WorkspaceError(f"{what}: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise WorkspaceUnavailable(f"the Docker engine does not answer ({what}): {exc}") from exc
    except TimeoutError as exc:
        raise WorkspaceUnavailable(f"the Docker engine did not answer in time ({what})") from exc


async def remove_container(container: DockerContainer) -> None:
    """Force-removes a container; a missing one is fine, a failure is left to the reaper."""
    try:
        async with engine_call("removing the workspace container"):
            await container.delete(force=True, v=True)
    except WorkspaceError as exc:
        cause = exc.__cause__
        # 404: gone already; 409: the engine is removing it already.
        if not isinstance(cause, aiodocker.DockerError) or cause.status not in (404, 409):
            log.warning("could not remove container %s: %s (the reaper will)", container.id, exc)


async def reap(
    docker: aiodocker.Docker, installation: str, keep: Callable[[UUID], Awaitable[bool]]
) -> list[str]:
    """Removes this installation's containers whose run `keep` does not vouch for; returns
    their ids. Containers of other installations on the same engine are left alone."""
    label_filter = f'{{"label": ["{LABEL_MANAGED}=true", "{LABEL_INSTALLATION}={installation}"]}}'
    async with engine_call("listing workspace containers"):
        containers = await docker.containers.list(all=True, filters=label_filter)
    removed = []
    for container in containers:
        labels = container._container.get("Labels") or {}
        try:
            run_id: UUID | None = UUID(labels.get(LABEL_RUN, ""))
        except ValueError:
            run_id = None
        if run_id is not None and await keep(run_id):
            continue
        await remove_container(container)
        removed.append(str(container.id))
    return removed


def tar_files(files: Mapping[str, bytes], *, mode: int = 0o644) -> bytes:
    """Files (and their folders) owned by the agent user, as a tar for put_archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in sorted({str(Path(name).parent) for name in files} - {"."}):
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


def tar_tree(root: Path) -> bytes:
    """A checked-out repository (with .git) as a tar owned by the agent user."""

    def owned_by_agent(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = AGENT_UID
        info.uname = info.gname = "agent"
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(root, arcname=".", filter=owned_by_agent)
    return buffer.getvalue()

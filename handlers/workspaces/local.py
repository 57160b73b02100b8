"""The `local` provisioner: a fresh clone in a directory of its own, removed afterwards.

It isolates runs from each other's files, not from the host: use it where no Docker engine
is reachable, for trusted agents (see docs/architecture.md, "Isolation").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from uuid import UUID, uuid4

from handlers.workspaces.base import LineSink, WorkspaceDiff, WorkspaceSpec
from handlers.workspaces.git import checkout, diff_on_host
from handlers.workspaces.process import run_checked, run_streaming

log = logging.getLogger(__name__)


class LocalWorkspace:
    def __init__(self, root: Path, base_commit: str, trash: _Trash) -> None:
        self._root = root
        self._trash = trash
        self.repo_dir = root / "repo"
        self.home = root / "home"
        self._base_commit = base_commit

    @property
    def base_commit(self) -> str:
        return self._base_commit

    async def write_scratch(self, name: str, content: str) -> str:
        path = self._root / "scratch" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        return str(path)

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        on_line: LineSink,
        timeout_s: float,
    ) -> int:
        # The marker lets a later worker find this agent's processes if this one dies.
        full_env = {"HOME": str(self.home), **env, _MARKER: str(self._root)}
        return await run_streaming(
            argv, cwd=self.repo_dir, env=full_env, on_line=on_line, timeout_s=timeout_s
        )

    async def diff(self) -> WorkspaceDiff:
        return await diff_on_host(self.repo_dir, self._base_commit, self.write_scratch)

    async def stop_agent(self) -> None:
        pass  # cancelling exec() killed the agent's whole process group already

    async def describe_exit(self, exit_code: int) -> str | None:
        return None

    async def close(self) -> None:
        """Moves the workspace aside at once (a rename): its slot is free for the next run
        while the files go (the trash removes them). A worker that dies first leaves them to
        reap()."""
        trash = self._root.with_name(f"{_TRASH_PREFIX}{self._root.name}-{uuid4().hex[:8]}")
        try:
            os.rename(self._root, trash)
        except OSError:
            await asyncio.to_thread(shutil.rmtree, self._root, True)
            return
        self._trash.add(trash)


class _Trash:
    """Removes the workspaces put in it with one `rm -rf` child for all those that gathered
    while the previous one ran: a Python rmtree per workspace, even in a thread, took ~10% of
    a drain's CPU samples in the worker's process, and its GIL."""

    _MOST_AT_ONCE = 200  # paths in one rm's argv: far below the kernel's limit

    def __init__(self) -> None:
        self._gathered: list[Path] = []
        self._emptying: asyncio.Task[None] | None = None

    async def emptied(self, timeout_s: float) -> None:
        """Waits until what was put in is removed (at most timeout_s: reap() takes the rest)."""
        if self._emptying is not None and not self._emptying.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._emptying), timeout_s)

    def add(self, path: Path) -> None:
        self._gathered.append(path)
        if self._emptying is None or self._emptying.done():
            self._emptying = asyncio.create_task(self._empty())

    async def _empty(self) -> None:
        while self._gathered:
            batch = self._gathered[: self._MOST_AT_ONCE]
            del self._gathered[: self._MOST_AT_ONCE]
            code, _, err = await run_checked(["rm", "-rf", "--", *map(str, batch)])
            if code != 0:  # left for reap() at the worker's next start
                log.warning("could not remove %d old workspace(s): %s", len(batch), err.strip())


class LocalProvisioner:
    name = "local"

    def __init__(self, workspaces_dir: Path) -> None:
        self._dir = workspaces_dir
        self._trash = _Trash()

    def reap(self) -> None:
        """Removes every workspace left behind by an earlier process of this worker, and kills
        the agents still running in them (they run in sessions of their own, so a killed
        worker does not take them along)."""
        if not self._dir.exists():
            return
        for pid in _leftover_agents(self._dir.resolve()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for leftover in self._dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    async def close(self) -> None:
        """Waits for the removal of finished workspaces, so that no `rm` outlives the worker."""
        await self._trash.emptied(timeout_s=30.0)

    async def discard(self, run_id: UUID) -> None:
        """Kills the agents of this run's workspace and removes it (recovery of a run whose
        worker died on this host: its agent runs in a session of its own and would go on)."""
        root = self._dir / str(run_id)  # as provision() named it in the agents' marker
        for pid in _leftover_agents(root, exact=True):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(shutil.rmtree, root, True)

    async def provision(self, spec: WorkspaceSpec) -> LocalWorkspace:
        root = self._dir / str(spec.run_id)
        if root.exists():  # an earlier attempt's, left by a worker that died (a thread hop less)
            await asyncio.to_thread(shutil.rmtree, root, True)
        (root / "home").mkdir(parents=True)
        try:
            base_commit = await checkout(root / "repo", spec, borrow=True)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, root, True)
            raise
        return LocalWorkspace(root, base_commit, self._trash)


_MARKER = "FORGELINE_WORKSPACE"
# Workspaces being removed: never a run's name (a UUID), so provision() never meets one.
_TRASH_PREFIX = ".removing-"


def _leftover_agents(workspaces: Path, *, exact: bool = False) -> list[int]:
    """Processes whose environment marks them as agents of a workspace under this folder
    (exact: of this very workspace)."""
    prefix = f"{_MARKER}={workspaces}".encode() if exact else f"{_MARKER}={workspaces}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        items = environ.split(b"\0")
        if any(item == prefix if exact else item.startswith(prefix) for item in items):
            found.append(int(entry.name))
    return found

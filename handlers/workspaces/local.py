"""The `local` provisioner: a fresh clone in a directory of its own, removed afterwards.

It isolates runs from each other's files, not from the host: use it where no Docker engine
is reachable, for trusted agents (see docs/architecture.md, "Isolation").
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from handlers.workspaces.base import LineSink, WorkspaceSpec
from handlers.workspaces.git import checkout, git
from handlers.workspaces.process import run_streaming


class LocalWorkspace:
    def __init__(self, root: Path, base_commit: str) -> None:
        self._root = root
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
        full_env = {"HOME": str(self.home), **env}
        return await run_streaming(
            argv, cwd=self.repo_dir, env=full_env, on_line=on_line, timeout_s=timeout_s
        )

    async def diff(self) -> str:
        await git(self.repo_dir, "add", "-A")
        return await git(self.repo_dir, "diff", "--cached", "--binary", self._base_commit)

    async def numstat(self) -> str:
        return await git(self.repo_dir, "diff", "--cached", "--numstat", self._base_commit)

    async def describe_exit(self, exit_code: int) -> str | None:
        return None

    async def close(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self._root, True)


class LocalProvisioner:
    name = "local"

    def __init__(self, workspaces_dir: Path) -> None:
        self._dir = workspaces_dir

    def reap(self) -> None:
        """Removes every workspace left behind by an earlier process of this worker."""
        if self._dir.exists():
            for leftover in self._dir.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)

    async def provision(self, spec: WorkspaceSpec) -> LocalWorkspace:
        root = self._dir / str(spec.run_id)
        await asyncio.to_thread(shutil.rmtree, root, True)
        (root / "home").mkdir(parents=True)
        try:
            base_commit = await checkout(root / "repo", spec)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, root, True)
            raise
        return LocalWorkspace(root, base_commit)

"""The `local` provisioner: a fresh clone in a directory of its own, removed afterwards.

It isolates runs from each other's files, not from the host: use it where no Docker engine
is reachable, for trusted agents (see docs/architecture.md, "Isolation").
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from handlers.workspaces.base import LineSink, RepoUnreachable, WorkspaceError, WorkspaceSpec
from handlers.workspaces.process import run_checked, run_streaming

# Git must never stop to ask for credentials: a run would hang instead of failing.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/true", "LC_ALL": "C"}
CLONE_TIMEOUT_S = 600.0


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
        await _git(self.repo_dir, "add", "-A")
        return await _git(self.repo_dir, "diff", "--cached", "--binary", self._base_commit)

    async def numstat(self) -> str:
        return await _git(self.repo_dir, "diff", "--cached", "--numstat", self._base_commit)

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
            base_commit = await _checkout(root / "repo", spec)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, root, True)
            raise
        return LocalWorkspace(root, base_commit)


async def _checkout(repo_dir: Path, spec: WorkspaceSpec) -> str:
    code, _, err = await run_checked(
        ["git", "clone", "--quiet", "--no-checkout", spec.repo, str(repo_dir)],
        env={**os.environ, **GIT_ENV},
        timeout_s=CLONE_TIMEOUT_S,
    )
    if code != 0:
        raise RepoUnreachable(f"cannot clone {spec.repo}: {_last_line(err)}")
    commit = await _resolve(repo_dir, spec.ref)
    await _git(repo_dir, "checkout", "--quiet", "--detach", commit)
    if spec.base_patch:
        code, _, err = await run_checked(
            ["git", "apply", "--binary", "--whitespace=nowarn", "-"],
            cwd=repo_dir,
            env={**os.environ, **GIT_ENV},
            stdin=spec.base_patch.encode(),
        )
        if code != 0:
            raise WorkspaceError(f"the previous run's patch does not apply: {_last_line(err)}")
    return commit


async def _resolve(repo_dir: Path, ref: str | None) -> str:
    candidates = ["HEAD"] if ref is None else [ref, f"origin/{ref}"]
    for candidate in candidates:
        code, out, _ = await run_checked(
            ["git", "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"],
            cwd=repo_dir,
            env={**os.environ, **GIT_ENV},
        )
        if code == 0:
            return out.strip()
    raise RepoUnreachable(f"ref {ref or 'HEAD'!r} does not name a commit in the repository")


async def _git(repo_dir: Path, *args: str) -> str:
    code, out, err = await run_checked(["git", *args], cwd=repo_dir, env={**os.environ, **GIT_ENV})
    if code != 0:
        raise WorkspaceError(f"git {args[0]} failed: {_last_line(err)}")
    return out


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"

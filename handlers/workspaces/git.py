"""Git on the worker's host: cloning a request's repository at its commit, and diffing."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from handlers.workspaces.base import RepoUnreachable, WorkspaceDiff, WorkspaceError, WorkspaceSpec
from handlers.workspaces.process import run_captured, run_checked

# Git must never stop to ask for credentials: a run would hang instead of failing.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/true", "LC_ALL": "C"}
CLONE_TIMEOUT_S = 600.0


async def checkout(repo_dir: Path, spec: WorkspaceSpec) -> str:
    """Clones spec.repo into repo_dir, detached at spec.ref with spec.base_patch applied;
    returns the base commit. Raises RepoUnreachable for a bad repo or ref."""
    code, _, err = await run_checked(
        ["git", "clone", "--quiet", "--no-checkout", spec.repo, str(repo_dir)],
        env=_env(),
        timeout_s=CLONE_TIMEOUT_S,
    )
    if code != 0:
        raise RepoUnreachable(f"cannot clone {spec.repo}: {last_line(err)}")
    commit = await _resolve(repo_dir, spec.ref)
    await git(repo_dir, "checkout", "--quiet", "--detach", commit)
    if spec.base_patch:
        code, _, err = await run_checked(
            ["git", "apply", "--binary", "--whitespace=nowarn", "-"],
            cwd=repo_dir,
            env=_env(),
            stdin=spec.base_patch.encode(),
        )
        if code != 0:
            raise WorkspaceError(f"the previous run's patch does not apply: {last_line(err)}")
    return commit


async def _resolve(repo_dir: Path, ref: str | None) -> str:
    candidates = ["HEAD"] if ref is None else [ref, f"origin/{ref}"]
    for candidate in candidates:
        code, out, _ = await run_checked(
            ["git", "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"],
            cwd=repo_dir,
            env=_env(),
        )
        if code == 0:
            return out.strip()
    raise RepoUnreachable(f"ref {ref or 'HEAD'!r} does not name a commit in the repository")


async def git(repo_dir: Path, *args: str) -> str:
    code, out, err = await run_checked(["git", *args], cwd=repo_dir, env=_env())
    if code != 0:
        raise WorkspaceError(f"git {args[0]} failed: {last_line(err)}")
    return out


def _env() -> dict[str, str]:
    return {**os.environ, **GIT_ENV}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


async def git_bytes(repo_dir: Path, *args: str) -> bytes:
    code, out, err = await run_captured(["git", *args], cwd=repo_dir, env=_env())
    if code != 0:
        raise WorkspaceError(f"git {args[0]} failed: {last_line(err.decode(errors='replace'))}")
    return out


GitBytes = Callable[..., Awaitable[bytes]]
WriteScratch = Callable[[str, str], Awaitable[str]]


async def patch_of(run_git: GitBytes, write_scratch: WriteScratch, base: str) -> WorkspaceDiff:
    """(diff, numstat) of everything in the work tree against base, untracked files included.

    The diff is text. A file whose diff is not UTF-8 (a Latin-1 text file, say) or holds a NUL
    byte is diffed as binary instead (base85 in the patch), so `git apply` restores its exact
    bytes."""
    await run_git("add", "-A")
    numstat = (await run_git("diff", "--cached", "--numstat", base)).decode(errors="replace")
    raw = await run_git("diff", "--cached", "--binary", base)
    if _storable_text(raw):
        return WorkspaceDiff(raw.decode(), numstat)
    names = await run_git("diff", "--cached", "--name-only", "-z", base)
    not_utf8 = []
    for name in filter(None, names.split(b"\0")):
        path = name.decode(errors="surrogateescape")
        if not _storable_text(await run_git("diff", "--cached", "--binary", base, "--", path)):
            not_utf8.append(path)
    attributes = await write_scratch(
        "gitattributes", "".join(f"{_literal_pattern(path)} binary\n" for path in not_utf8)
    )
    raw = await run_git(
        "-c", f"core.attributesFile={attributes}", "diff", "--cached", "--binary", base
    )
    return WorkspaceDiff(raw.decode(errors="replace"), numstat)


def _storable_text(diff: bytes) -> bool:
    """UTF-8 without NUL: git diffs a file with a NUL byte past its first 8000 bytes as text,
    and Postgres text cannot hold U+0000 (the read tables would show U+FFFD instead)."""
    if b"\0" in diff:
        return False
    try:
        diff.decode()
    except UnicodeDecodeError:
        return False
    return True


def _literal_pattern(path: str) -> str:
    """A gitattributes pattern matching exactly this path: glob characters are escaped with a
    backslash, then the pattern is C-quoted (backslashes and quotes escaped again)."""
    glob_escaped = "".join("\\" + c if c in "*?[\\" else c for c in path)
    quoted = glob_escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"/{quoted}"'

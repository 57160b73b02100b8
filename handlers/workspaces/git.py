"""Git on the worker's host: cloning a request's repository at its commit, and diffing."""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from handlers.workspaces.base import RepoUnreachable, WorkspaceDiff, WorkspaceError, WorkspaceSpec
from handlers.workspaces.process import run_captured, run_checked

# Git must never stop to ask for credentials: a run would hang instead of failing.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/true", "LC_ALL": "C"}
CLONE_TIMEOUT_S = 600.0


# One child process for the whole checkout, and one for the diff: each child the worker
# starts costs it a fork/exec and an event-loop round trip, and a no-op run is mostly those
# (bench case 5). The script's exit codes above 200 say which step failed (203, checkout, and
# anything else: the generic error below); git's stderr says why.
_CLONE_FAILED, _NO_SUCH_REF, _PATCH_DOES_NOT_APPLY = 201, 202, 204
_CHECKOUT_SCRIPT = """
checkout() { git -c core.logAllRefUpdates=false checkout --quiet --detach "$1^{commit}"; }
git -c core.logAllRefUpdates=false clone --quiet --no-checkout --template= -- "$1" "$2" || exit 201
cd "$2" || exit 203
if ! { checkout "$3" 2>/dev/null || { [ -n "$4" ] && checkout "$4" 2>/dev/null; }; }; then
  # Only now ask why (a rev-parse a run costs a child): no such commit, or the checkout broke.
  for ref in "$3" "$4"; do
    [ -n "$ref" ] && git rev-parse --verify --quiet "$ref^{commit}" >/dev/null && break
  done || exit 202
  checkout "$ref"; exit 203
fi
if [ "$5" = patch ]; then git apply --binary --whitespace=nowarn - || exit 204; fi
read -r commit < .git/HEAD
printf %s "$commit"
"""


async def checkout(repo_dir: Path, spec: WorkspaceSpec, *, borrow: bool = False) -> str:
    """Clones spec.repo into repo_dir, detached at spec.ref with spec.base_patch applied;
    returns the base commit. Raises RepoUnreachable for a bad repo or ref.

    The clone leaves git's template out (`--template=`: no sample hooks, nothing a run
    needs): fewer files to write now and to delete when the workspace goes.

    borrow: when spec.repo is a repository on this host, the workspace borrows its objects
    instead of cloning them (see _checkout_borrowing); only for a workspace that stays on
    this host (the local provisioner: a Docker workspace's copy must hold its objects)."""
    source = _git_dir_on_host(spec.repo) if borrow else None
    if source is not None:
        return await _checkout_borrowing(repo_dir, spec, source)
    ref, fallback = ("HEAD", "") if spec.ref is None else (spec.ref, f"origin/{spec.ref}")
    code, out, err = await run_checked(
        ["sh", "-c", _CHECKOUT_SCRIPT, "checkout", spec.repo, str(repo_dir), ref, fallback,
         "patch" if spec.base_patch else ""],
        env=_env(),
        stdin=spec.base_patch.encode() if spec.base_patch else None,
        timeout_s=CLONE_TIMEOUT_S,
    )  # fmt: skip
    if code == 0:
        return out.strip()
    if code == _CLONE_FAILED:
        raise RepoUnreachable(f"cannot clone {spec.repo}: {last_line(err)}")
    if code == _NO_SUCH_REF:
        wanted = spec.ref or "HEAD"
        raise RepoUnreachable(f"ref {wanted!r} does not name a commit in the repository")
    if code == _PATCH_DOES_NOT_APPLY:
        raise WorkspaceError(f"the previous run's patch does not apply: {last_line(err)}")
    raise WorkspaceError(f"git checkout failed: {last_line(err)}")


def _git_dir_on_host(repo: str) -> Path | None:
    """The git directory of repo when it is a path to a repository on this host (a work tree
    with a .git folder, or a bare repository); None for anything else (a URL, a linked
    worktree, no repository at all: the clone takes those and names what is wrong)."""
    if not repo.startswith("/") or "\n" in repo:
        return None
    path = Path(repo)
    for git_dir in (path / ".git", path):
        if (git_dir / "objects").is_dir() and (git_dir / "HEAD").is_file():
            return git_dir
    return None


async def _checkout_borrowing(repo_dir: Path, spec: WorkspaceSpec, source: Path) -> str:
    """A new repository in repo_dir that reads the source's objects through
    objects/info/alternates (what `git clone --shared` sets up), detached at the ref as the
    source resolves it. Two git children (rev-parse, checkout) instead of the clone's five
    processes (sh, clone, sh, upload-pack, checkout): on a host where every process start
    costs ~1 ms (glibc's CPU probing traps to the hypervisor), the clone was most of a no-op
    run's CPU.

    What differs from a clone: objects the agent writes land in the workspace; the ones it
    reads stay in the source, which must not prune them while the run lasts (as with
    `clone --shared`); the workspace has the origin remote but no remote-tracking refs."""
    wanted = spec.ref or "HEAD"
    code, out, err = await run_checked(
        ["git", f"--git-dir={source}", "rev-parse", "--verify", "--quiet", "--end-of-options",
         f"{wanted}^{{commit}}"],
        env=_env(),
    )  # fmt: skip
    if code != 0 and err.strip():  # --quiet silences a missing ref, not an unreadable repo
        raise RepoUnreachable(f"cannot read {spec.repo}: {last_line(err)}")
    if code != 0:
        raise RepoUnreachable(f"ref {wanted!r} does not name a commit in the repository")
    commit = out.strip()
    _init_borrowing(repo_dir / ".git", (source / "objects").resolve(), spec.repo, commit)
    code, _, err = await run_checked(
        ["git", "-c", "core.logAllRefUpdates=false", "checkout", "--quiet", "--detach", commit],
        cwd=repo_dir,
        env=_env(),
        timeout_s=CLONE_TIMEOUT_S,
    )
    if code != 0:
        raise WorkspaceError(f"git checkout failed: {last_line(err)}")
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


def _init_borrowing(git_dir: Path, objects: Path, origin: str, commit: str) -> None:
    """What `git init` + `git remote add origin` would write (gitrepository-layout(5)), by
    hand: one git child less a run. HEAD is replaced by the checkout that follows."""
    (git_dir / "objects" / "info").mkdir(parents=True)
    (git_dir / "refs" / "heads").mkdir(parents=True)
    (git_dir / "refs" / "tags").mkdir()
    (git_dir / "objects" / "info" / "alternates").write_text(f"{objects}\n")
    (git_dir / "HEAD").write_text("ref: refs/heads/main\n")
    # The object format must be the source's: a SHA-256 repository names commits in 64 hex.
    sha256 = len(commit) == 64
    (git_dir / "config").write_text(
        f"[core]\n\trepositoryformatversion = {1 if sha256 else 0}\n\tbare = false\n"
        + ("[extensions]\n\tobjectformat = sha256\n" if sha256 else "")
        + f'[remote "origin"]\n\turl = {_config_value(origin)}\n'
        "\tfetch = +refs/heads/*:refs/remotes/origin/*\n"
    )


def _config_value(text: str) -> str:
    """text as a quoted git-config value (backslashes and quotes escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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


# The diff in one child: numstat, a blank line, then the patch (`--numstat -p`), untracked
# files included (`add -A`). Usable where git runs (the host, a container): argv + base.
DIFF_ARGV = ["sh", "-c", 'git add -A && exec git diff --cached --binary --numstat -p "$1"', "diff"]


def diff_from_output(out: bytes) -> WorkspaceDiff | None:
    """The WorkspaceDiff DIFF_ARGV printed; None when it cannot be stored as text (not UTF-8,
    or a NUL byte): then patch_of diffs such files as binary."""
    numstat, _, raw = out.partition(b"\n\n")
    if not _storable_text(raw):
        return None
    return WorkspaceDiff(raw.decode(), numstat.decode(errors="replace") + "\n" if numstat else "")


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


async def diff_on_host(repo_dir: Path, base: str, write_scratch: WriteScratch) -> WorkspaceDiff:
    """(diff, numstat) of the work tree in repo_dir against base, as patch_of gives it."""
    code, out, err = await run_captured([*DIFF_ARGV, base], cwd=repo_dir, env=_env())
    if code != 0:
        raise WorkspaceError(f"git diff failed: {last_line(err.decode(errors='replace'))}")
    found = diff_from_output(out)
    if found is None:
        found = await patch_of(functools.partial(git_bytes, repo_dir), write_scratch, base)
    return found


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

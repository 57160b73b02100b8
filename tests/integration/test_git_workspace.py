"""handlers/workspaces/git.py against real git: the checkout (a clone, or for a repository on
this host a workspace borrowing its objects: every checkout test runs both ways) and the diff."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from uuid import uuid4

import pytest

from handlers.workspaces.base import RepoUnreachable, WorkspaceError, WorkspaceSpec
from handlers.workspaces.git import checkout, diff_on_host


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True)
    return done.stdout.decode().strip()


def _commit_all(repo: Path, message: str) -> None:
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", message)


def _new_repo(path: Path, *init_options: str) -> Path:
    """A repository at path with one commit: README.md holding "first"."""
    path.mkdir()
    _git(path, "init", "--quiet", *init_options)
    (path / "README.md").write_text("first\n")
    _commit_all(path, "one")
    return path


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    repo = _new_repo(tmp_path / "origin", "--initial-branch=main")
    _git(repo, "checkout", "--quiet", "-b", "feature")
    (repo / "feature.txt").write_text("on the branch\n")
    _commit_all(repo, "two")
    _git(repo, "checkout", "--quiet", "main")
    return repo


@pytest.fixture(params=[False, True], ids=["clone", "borrow"])
def borrow(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _spec(repo: Path | str, ref: str | None = None, base_patch: str | None = None) -> WorkspaceSpec:
    return WorkspaceSpec(
        run_id=uuid4(), request_id=uuid4(), repo=str(repo), ref=ref, base_patch=base_patch
    )


async def test_checkout_of_a_branch_only_on_origin_is_detached_at_its_commit(
    origin: Path, tmp_path: Path, borrow: bool
) -> None:
    commit = await checkout(tmp_path / "ws", _spec(origin, "feature"), borrow=borrow)

    assert commit == _git(origin, "rev-parse", "feature")
    assert _git(tmp_path / "ws", "rev-parse", "HEAD") == commit
    assert (tmp_path / "ws" / "feature.txt").read_text() == "on the branch\n"
    # No template: no sample hooks in a workspace (nothing a run needs, files to delete).
    assert not (tmp_path / "ws" / ".git" / "hooks").exists()


async def test_checkout_names_the_bad_repo_or_ref(
    origin: Path, tmp_path: Path, borrow: bool
) -> None:
    with pytest.raises(RepoUnreachable, match=r"cannot clone .*nowhere"):
        await checkout(tmp_path / "a", _spec(tmp_path / "nowhere"), borrow=borrow)
    with pytest.raises(RepoUnreachable, match="ref 'no-such-branch' does not name a commit"):
        await checkout(tmp_path / "b", _spec(origin, "no-such-branch"), borrow=borrow)
    with pytest.raises(RepoUnreachable, match="ref '--help' does not name a commit"):
        await checkout(tmp_path / "c", _spec(origin, "--help"), borrow=borrow)
    (origin / ".git" / "HEAD").write_text("not a ref\n")  # git now refuses the repository
    with pytest.raises(RepoUnreachable, match=rf"cannot (clone|read) {re.escape(str(origin))}: "):
        await checkout(tmp_path / "d", _spec(origin), borrow=borrow)


async def test_checkout_applies_the_base_patch_or_says_it_does_not_apply(
    origin: Path, tmp_path: Path, borrow: bool
) -> None:
    patch = (
        "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n"
        "@@ -1 +1,2 @@\n first\n+second\n"
    )
    await checkout(tmp_path / "ok", _spec(origin, base_patch=patch), borrow=borrow)
    assert (tmp_path / "ok" / "README.md").read_text() == "first\nsecond\n"

    stale = patch.replace(" first\n", " something else\n")
    with pytest.raises(WorkspaceError, match="the previous run's patch does not apply"):
        await checkout(tmp_path / "stale", _spec(origin, base_patch=stale), borrow=borrow)


async def test_diff_on_host_matches_git_and_takes_untracked_files(
    origin: Path, tmp_path: Path, borrow: bool
) -> None:
    ws = tmp_path / "ws"
    base = await checkout(ws, _spec(origin), borrow=borrow)
    (ws / "README.md").write_text("first\nchanged\n")
    (ws / "new.txt").write_text("new\n")
    (ws / "data.bin").write_bytes(b"\x00\x01\x02")

    async def no_scratch(name: str, content: str) -> str:
        raise AssertionError("the one-child path needs no scratch file")

    found = await diff_on_host(ws, base, no_scratch)

    assert found.diff == _git(ws, "diff", "--cached", "--binary", base) + "\n"
    assert found.numstat == _git(ws, "diff", "--cached", "--numstat", base) + "\n"
    assert "new.txt" in found.diff and "GIT binary patch" in found.diff


async def test_diff_on_host_of_no_change_is_empty(origin: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    base = await checkout(ws, _spec(origin))

    async def no_scratch(name: str, content: str) -> str:
        raise AssertionError("not needed")

    assert tuple(await diff_on_host(ws, base, no_scratch)) == ("", "")


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


async def test_a_borrowing_workspace_reads_the_source_and_writes_only_itself(
    origin: Path, tmp_path: Path
) -> None:
    ws = tmp_path / "ws"
    base = await checkout(ws, _spec(origin), borrow=True)
    source_objects = _files_under(origin / ".git" / "objects")

    alternates = (ws / ".git" / "objects" / "info" / "alternates").read_text()
    assert alternates == f"{(origin / '.git' / 'objects').resolve()}\n"
    assert _git(ws, "remote", "get-url", "origin") == str(origin)
    # An agent's commit is the workspace's own; the source's object store is untouched.
    (ws / "README.md").write_text("changed\n")
    _git(ws, "-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qam", "agent")
    assert _git(ws, "rev-parse", "HEAD~1") == base
    assert _files_under(origin / ".git" / "objects") == source_objects
    _git(ws, "fsck", "--no-progress", "--no-dangling")  # raises unless every object is there


async def test_a_workspace_borrowing_from_a_sha256_repository_has_its_object_format(
    tmp_path: Path,
) -> None:
    source = _new_repo(tmp_path / "sha256", "--object-format=sha256")

    commit = await checkout(tmp_path / "ws", _spec(source), borrow=True)

    assert len(commit) == 64 and _git(tmp_path / "ws", "rev-parse", "HEAD") == commit
    assert (tmp_path / "ws" / "README.md").read_text() == "first\n"

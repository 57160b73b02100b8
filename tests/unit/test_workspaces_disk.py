"""The workspaces folder is marked as a hierarchy top where the filesystem has the mark."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from handlers.workspaces.disk import prepare_workspaces_dir


def test_a_new_folder_is_created_and_marked_as_chattr_would(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "workspaces"
    if not prepare_workspaces_dir(folder):
        pytest.skip(f"{tmp_path}'s filesystem has no top-of-hierarchy mark (not ext2/3/4)")
    assert folder.is_dir()
    attributes = subprocess.run(
        ["lsattr", "-d", str(folder)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert "T" in attributes
    assert prepare_workspaces_dir(folder)  # again: still marked, nothing fails


def test_a_filesystem_without_the_mark_is_left_as_it_is() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm (tmpfs) here")
    folder = shm / f"forgeline-test-{id(shm)}"
    try:
        assert prepare_workspaces_dir(folder) is False
        assert folder.is_dir()
    finally:
        folder.rmdir()

"""Fixtures of the fault-injection suite: its own Postgres (one scenario restarts it), a sample
repository, and a scratch folder per scenario."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.embedded import EmbeddedPostgres, start_postgres


def short_dir(prefix: str) -> Path:
    """Under /tmp: unix socket paths (Postgres, dockerd) must stay short."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o711)  # as root, Postgres runs as another user that must reach it
    return path


@pytest.fixture(scope="session")
def faults_pg() -> Iterator[EmbeddedPostgres]:
    """A Postgres of the suite's own, not the session's shared one: a scenario restarts it."""
    data_dir = short_dir("fl-faults-pg-")
    server = start_postgres(data_dir)
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-commit repository every request of the load works on."""
    path = tmp_path_factory.mktemp("faults") / "repo"
    path.mkdir()
    git = ["git", "-C", str(path), "-c", "user.name=Faults", "-c", "user.email=f@invalid"]
    subprocess.run([*git[:3], "init", "-q", "--initial-branch=main"], check=True)
    (path / "README.md").write_text("# faults\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "-c", "commit.gpgsign=false", "commit", "-qm", "init"], check=True)
    return path


@pytest.fixture
def scratch() -> Iterator[Path]:
    """The data of one scenario: NATS store, role data dirs, logs."""
    path = short_dir("fl-faults-")
    yield path
    shutil.rmtree(path, ignore_errors=True)

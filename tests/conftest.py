"""Real servers for the session (embedded NATS and Postgres in temp dirs) and a sample git repo.

The tests never touch the machine's standard ports (4222, 5432): every server here lives in a
temporary directory and listens on a port the OS picked (Postgres: only on a unix socket).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from forgeline.embedded import EmbeddedPostgres, start_nats, start_postgres


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A JetStream-enabled nats-server for the whole session."""
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """A Postgres for the whole session, in a short /tmp dir (unix socket paths must be short)."""
    data_dir = Path(tempfile.mkdtemp(prefix="fl-pg-", dir="/tmp"))
    data_dir.chmod(0o711)  # when root, Postgres runs as another user that must reach the dir
    server = start_postgres(data_dir)
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def database_url(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """A fresh empty database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """A git repository with two commits: README.md, then src/hello.py."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "--quiet", "--initial-branch=main")
    _git(repo, "config", "user.name", "Forgeline Tests")
    _git(repo, "config", "user.email", "tests@forgeline.invalid")
    _git(repo, "config", "commit.gpgsign", "false")
    (repo / "README.md").write_text("# Sample\n\nA repository for Forgeline's tests.\n")
    _git(repo, "add", "README.md")
    _git(repo, "commit", "--quiet", "-m", "Add README")
    (repo / "src").mkdir()
    (repo / "src" / "hello.py").write_text('def hello() -> str:\n    return "hello"\n')
    _git(repo, "add", "src/hello.py")
    _git(repo, "commit", "--quiet", "-m", "Add src/hello.py")
    return repo

"""The embedded servers, for real: processes, permissions, persistence, reuse."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nats
import psycopg
import pytest

from forgeline.embedded import EmbeddedPostgres, EmbeddedServerError, start_nats, start_postgres


def _postmaster_pid(server: EmbeddedPostgres) -> int:
    return int((server.pgdata / "postmaster.pid").read_text().splitlines()[0])


def _process_uid(pid: int) -> int:
    """The real uid of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private data dir with a short path (the Postgres socket lives under it)."""
    path = Path(tempfile.mkdtemp(prefix="fl-t-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_jetstream_stores_and_acks(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="EMBEDDED_T1", subjects=["embedded.t1.>"])
        ack = await js.publish("embedded.t1.x", b"hello", headers={"Nats-Msg-Id": "m1"})
        assert (ack.stream, ack.seq) == ("EMBEDDED_T1", 1)
        again = await js.publish("embedded.t1.x", b"hello", headers={"Nats-Msg-Id": "m1"})
        assert again.duplicate
        await js.delete_stream("EMBEDDED_T1")
    finally:
        await nc.close()


async def test_jetstream_data_survives_a_restart(tmp_path: Path) -> None:
    server = start_nats(tmp_path, sync_always=True)
    try:
        assert 'sync_interval: "always"' in (tmp_path / "nats.conf").read_text()
        nc = await nats.connect(server.url)
        await nc.jetstream().add_stream(name="KEEP", subjects=["keep.>"])
        await nc.jetstream().publish("keep.a", b"1")
        await nc.close()
    finally:
        server.stop()
    server = start_nats(tmp_path)  # a new free port, same store
    try:
        nc = await nats.connect(server.url)
        info = await nc.jetstream().stream_info("KEEP")
        await nc.close()
        assert info.state.messages == 1
    finally:
        server.stop()


def test_nats_failure_explains_itself(tmp_path: Path) -> None:
    # bound but not listening: the server cannot bind it, and clients are refused at once
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(EmbeddedServerError, match="address already in use") as failure:
            start_nats(tmp_path, port=taken.getsockname()[1])
    assert "Fix:" in str(failure.value)


def test_postgres_runs_unprivileged_and_has_the_database(pg_server: EmbeddedPostgres) -> None:
    uid = _process_uid(_postmaster_pid(pg_server))
    if os.geteuid() == 0:
        assert uid == pwd.getpwnam("forgeline").pw_uid != 0
    else:
        assert uid == os.geteuid()
    with psycopg.connect(pg_server.url()) as conn:
        row = conn.execute("SELECT current_database(), current_user").fetchone()
    assert row == ("forgeline", "postgres")
    assert (pg_server.socket_dir / f".s.PGSQL.{pg_server.port}").is_socket()


def test_postgres_listens_on_no_tcp_port(pg_server: EmbeddedPostgres) -> None:
    with psycopg.connect(pg_server.url()) as conn:
        row = conn.execute("SHOW listen_addresses").fetchone()
    assert row == ("",)


def test_second_start_reuses_the_running_server(pg_server: EmbeddedPostgres) -> None:
    pid = _postmaster_pid(pg_server)
    again = start_postgres(pg_server.data_dir, dbname="other")
    assert _postmaster_pid(again) == pid
    with psycopg.connect(again.url("other")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_postgres_data_survives_stop_and_start(short_dir: Path) -> None:
    server = start_postgres(short_dir)
    try:
        with psycopg.connect(server.url()) as conn:
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('still here')")
        server.stop()
        assert not (server.pgdata / "postmaster.pid").exists()
        server.stop()  # idempotent
        server = start_postgres(short_dir)
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [("still here",)]
    finally:
        server.stop()


def test_too_long_data_dir_is_refused_with_advice(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="shorter --data-dir"):
        start_postgres(tmp_path / ("x" * 100))


def test_database_url_gives_each_test_its_own_database(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        conn.execute("CREATE TABLE mine (id int)")
    assert name is not None and name[0].startswith("t_")


def test_git_repo_has_two_commits(git_repo: Path) -> None:
    log = subprocess.run(
        ["git", "log", "--format=%s"], cwd=git_repo, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert log[:2] == ["Add src/hello.py", "Add README"]
    assert (git_repo / "src" / "hello.py").is_file()

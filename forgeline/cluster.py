"""nats-server processes that can be killed and started again in place: one node, or a
JetStream cluster of several nodes on loopback.

The fault-injection suite (tests/faults/) and the recovery benchmark need to crash a broker and
bring the same one back (same ports, same store), which `forgeline.embedded.start_nats` does not
offer. `forgeline up` keeps its single embedded node; a cluster is for a deployment whose
streams are replicated (FORGELINE_STREAM_REPLICAS=3, FORGELINE_NATS_URL listing every node).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import nats

from forgeline.embedded import (
    EmbeddedServerError,
    _ignore,
    _nats_binary,
    _wait_nats,
    restartable_port,
)

log = logging.getLogger(__name__)

CLUSTER_NAME = "forgeline"


@dataclass(frozen=True)
class Routes:
    """A node's place in a cluster: its own route port and its peers' route URLs."""

    port: int
    peers: tuple[str, ...]


class NatsNode:
    """One nats-server with JetStream in store_dir, on a fixed port kept across restarts."""

    def __init__(
        self,
        store_dir: Path,
        *,
        name: str = "n1",
        host: str = "127.0.0.1",
        port: int | None = None,
        routes: Routes | None = None,
        sync_always: bool = False,
    ) -> None:
        self.name = name
        self.store_dir = Path(store_dir).resolve()
        self.host = host
        self.port = restartable_port(host) if port is None else port
        self.url = f"nats://{host}:{self.port}"
        self.routes = routes
        self.sync_always = sync_always
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, wait: bool = True) -> None:
        """Starts the server; with wait, returns once JetStream answers through it (in a
        cluster that needs a quorum of nodes up: start them all with wait=False first)."""
        if self.running:
            raise EmbeddedServerError(f"nats-server {self.name} is running already")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self._write_conf()
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [str(_nats_binary()), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session: a test's Ctrl-C or a killed parent group never takes it along
            # unannounced; its owner stops it.
            start_new_session=True,
        )
        self.starts += 1
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Returns once JetStream answers API calls through this node (raises after 20 s)."""
        if self._process is None:
            raise EmbeddedServerError(f"nats-server {self.name} was never started")
        _wait_nats(self._process, self.url, self.log_path)
        log.info("nats-server %s pid %s ready at %s", self.name, self._process.pid, self.url)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed (JetStream has not fsynced by default)."""
        self._end(signal.SIGKILL, timeout=10)

    def stop(self) -> None:
        """SIGTERM lets the server flush its store; SIGKILL only if it hangs. Idempotent."""
        self._end(signal.SIGTERM, timeout=15)

    def restart(self) -> None:
        """Starts the node again after kill() or stop(): same port, same store."""
        self.start(wait=True)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("nats-server %s ignored %s; killing it", self.name, sig.name)
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _write_conf(self) -> Path:
        # Strings go through json.dumps: NATS config accepts JSON-style quoted strings.
        lines = [
            f"server_name: {json.dumps(self.name)}",
            f"listen: {json.dumps(f'{self.host}:{self.port}')}",
            "max_payload: 8MB",
            f"pid_file: {json.dumps(str(self.store_dir / 'nats.pid'))}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.store_dir / 'jetstream'))}",
        ]
        if self.sync_always:
            lines.append('  sync_interval: "always"')
        lines.append("}")
        if self.routes is not None:
            lines += [
                "cluster {",
                f"  name: {json.dumps(CLUSTER_NAME)}",
                f"  listen: {json.dumps(f'{self.host}:{self.routes.port}')}",
                f"  routes: {json.dumps(list(self.routes.peers))}",
                "}",
            ]
        conf = self.store_dir / "nats.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf


class NatsCluster:
    """Several NatsNodes routed to each other on loopback, one JetStream domain."""

    def __init__(self, root: Path, size: int = 3, *, host: str = "127.0.0.1") -> None:
        if size < 3:
            # JetStream's meta group needs a majority: fewer than 3 nodes tolerate no loss.
            raise ValueError("a JetStream cluster needs at least 3 nodes")
        route_ports = [restartable_port(host) for _ in range(size)]
        self.nodes = [
            NatsNode(
                Path(root) / f"n{i + 1}",
                name=f"n{i + 1}",
                host=host,
                routes=Routes(
                    port=route_ports[i],
                    peers=tuple(
                        f"nats-route://{host}:{p}" for j, p in enumerate(route_ports) if j != i
                    ),
                ),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: the form FORGELINE_NATS_URL takes."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        """Starts every node, then waits until JetStream answers through each of them."""
        try:
            for node in self.nodes:
                node.start(wait=False)
            for node in self.nodes:
                node.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


def start_cluster(root: Path, size: int = 3) -> NatsCluster:
    """A running cluster of size nodes under root (one store dir each)."""
    cluster = NatsCluster(root, size)
    cluster.start()
    return cluster


async def replicas_current(url: str, streams: Sequence[str]) -> bool:
    """Whether every replica of these streams is caught up with its leader (a restarted node
    has rejoined), as the cluster reports it through url (one node's URL)."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2, error_cb=_ignore)
    try:
        js = nc.jetstream()
        for name in streams:
            info = await js.stream_info(name)
            cluster = info.cluster
            if cluster is None or cluster.leader is None:
                return False
            if any(not replica.current for replica in cluster.replicas or []):
                return False
        return True
    finally:
        await nc.close()


def wait_replicas_current(url: str, streams: Sequence[str], timeout: float = 60.0) -> None:
    """Polls replicas_current until true; EmbeddedServerError after timeout seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if asyncio.run(replicas_current(url, streams)):
                return
        except Exception as exc:  # a node still electing answers with errors for a while
            last = exc
        time.sleep(0.2)
    raise EmbeddedServerError(
        f"the replicas of {', '.join(streams)} did not catch up within {timeout} s"
        + (f" (last error: {last!r})" if last else "")
    )

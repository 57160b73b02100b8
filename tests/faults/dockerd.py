"""A Docker engine of the suite's own: a second dockerd with its own socket, data root and exec
root (so its own containerd), no bridge and no iptables rules.

The machine's engine is shared by everyone's tests; restarting it would break theirs. This one
is started by the suite, so the suite may stop and restart it: the fault is the same (the engine
and every container it runs go away, then the engine answers again), on nobody else's work.
The workspace image is copied from the machine's engine (`docker save | docker load`, ~5 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

from tests.helpers import wait_until


def dockerd_binary() -> str | None:
    return shutil.which("dockerd") or next(
        (p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if Path(p).exists()), None
    )


def machine_has_image(image: str) -> bool:
    """Whether the machine's own engine answers and holds image."""
    if shutil.which("docker") is None:
        return False
    try:
        found = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return found.returncode == 0


class PrivateDockerd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"unix://{root / 'docker.sock'}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def docker(
        self, *args: str, timeout: float = 60, stdin: IO[bytes] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["docker", "-H", self.url, *args],
            stdin=stdin,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def answers(self) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.docker("version", timeout=5).returncode == 0
        return False

    def start(self, timeout: float = 60) -> None:
        binary = dockerd_binary()
        assert binary is not None, "no dockerd on this machine"
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = (self.root / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            [
                # Its own network namespace: a dockerd with --bridge none deletes the docker0
                # interface it finds (libnetwork's removeDefaultBridgeInterface), which would
                # take the machine's engine's default bridge away.
                *(["unshare", "--net", "--"] if shutil.which("unshare") else []),
                binary,
                "--host",
                self.url,
                "--data-root",
                str(self.root / "data"),
                "--exec-root",
                str(self.root / "exec"),
                "--pidfile",
                str(self.root / "docker.pid"),
                "--bridge",
                "none",
                "--iptables=false",
                "--ip-masq=false",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._up, timeout, "the suite's dockerd to answer", interval=0.2)

    def _up(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"dockerd exited:\n{self.tail()}"
        return self.answers()

    def load_image(self, image: str) -> None:
        """Copies image from the machine's engine into this one."""
        with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE) as save:
            loaded = self.docker("load", timeout=300, stdin=save.stdout)
        assert save.returncode == 0 and loaded.returncode == 0, loaded.stderr

    def running_containers(self) -> int:
        out = self.docker("ps", "-q")
        return len(out.stdout.split()) if out.returncode == 0 else 0

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM, as `systemctl stop docker` does: it stops its containers, then exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, down_s: float) -> float:
        """Stops the engine, leaves it down for down_s, starts it; returns the seconds it did
        not answer."""
        began = time.monotonic()
        self.stop()
        time.sleep(down_s)  # the outage itself, not a wait for a condition
        self.start()
        return time.monotonic() - began

    def leftover_processes(self) -> list[int]:
        """Processes of this engine still alive after it stopped: a containerd-shim (and its
        `runc init`) of a container being created when the engine went down outlives it."""
        shims = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if str(self.root).encode() in (entry / "cmdline").read_bytes():
                        shims.append(int(entry.name))
        children = [
            int(pid)
            for shim in shims
            for pid in subprocess.run(
                ["pgrep", "-P", str(shim)], capture_output=True, text=True, check=False
            ).stdout.split()
        ]
        return children + shims

    def remove(self) -> None:
        """After stop(): ends what the engine left running, unmounts what it left mounted under
        its root, removes its files."""
        for pid in self.leftover_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        mounts = Path("/proc/mounts").read_text().splitlines()
        points = sorted(
            (line.split()[1] for line in mounts if line.split()[1].startswith(str(self.root))),
            reverse=True,
        )
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "dockerd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

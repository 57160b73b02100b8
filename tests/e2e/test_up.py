"""`forgeline up` when it cannot serve: a readable message, a non-zero exit, nothing left over."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from tests.e2e.support import (
    PROVISIONER,
    clean_env,
    forgeline_executable,
    short_tmp_dir,
    stop_leftover_postgres,
)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_a_taken_port_is_explained_without_a_traceback() -> None:
    root = short_tmp_dir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            result = subprocess.run(
                [
                    forgeline_executable(),
                    "up",
                    "--data-dir",
                    str(root / "data"),
                    "--port",
                    str(port),
                ],
                env=clean_env(provisioner=PROVISIONER),
                capture_output=True,
                text=True,
                timeout=90,
                stdin=subprocess.DEVNULL,
                check=False,
            )
            assert result.returncode != 0
            assert not _processes_mentioning(str(root)), "servers left running"
            assert str(port) in result.stderr, result.stderr
            assert "Traceback" not in result.stderr, result.stderr
        finally:
            stop_leftover_postgres(root / "data")
            shutil.rmtree(root, ignore_errors=True)

"""Running a child process with line-by-line output, a timeout, and a clean kill."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from handlers.workspaces.base import AgentTimedOut, LineSink

_READ_LIMIT = 1024 * 1024
_KILL_GRACE_S = 2.0
_DRAIN_S = 60.0  # reading what an agent printed before it ended


async def run_streaming(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    on_line: LineSink,
    timeout_s: float,
) -> int:
    """Runs argv in its own process group; on timeout or cancellation the whole group dies."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=_READ_LIMIT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        asyncio.create_task(_pump(proc.stdout, "stdout", on_line)),
        asyncio.create_task(_pump(proc.stderr, "stderr", on_line)),
    ]
    timed_out = False
    try:
        async with asyncio.timeout(timeout_s):
            code = await proc.wait()
    except TimeoutError:
        timed_out = True
        await _terminate(proc)
    except asyncio.CancelledError:
        await asyncio.shield(_terminate(proc))
        for reader in readers:
            reader.cancel()
        raise
    # The agent is gone: what it left running in its group goes too, so the pipes close once
    # the last line is read. Every line already written is read and published.
    _kill_group(proc.pid, signal.SIGKILL)
    _, still_reading = await asyncio.wait(readers, timeout=_DRAIN_S)
    for reader in still_reading:
        reader.cancel()
    if still_reading:
        await on_line("stderr", f"[forgeline] output not fully read within {_DRAIN_S:g} s")
    if timed_out:
        raise AgentTimedOut(f"agent still running after {timeout_s:g} s; killed")
    return code


async def run_checked(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout_s: float = 300.0,
) -> tuple[int, str, str]:
    """Runs a short command and returns (exit code, stdout, stderr) as text."""
    code, out, err = await run_captured(argv, cwd=cwd, env=env, stdin=stdin, timeout_s=timeout_s)
    return code, out.decode(errors="replace"), err.decode(errors="replace")


async def run_captured(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout_s: float = 300.0,
) -> tuple[int, bytes, bytes]:
    """Runs a short command and returns (exit code, stdout, stderr) as bytes."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(stdin)
    except (TimeoutError, asyncio.CancelledError):
        await asyncio.shield(_terminate(proc))
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


async def _pump(stream: asyncio.StreamReader, name: str, on_line: LineSink) -> None:
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line longer than the limit: take what is buffered
            raw = await stream.read(_READ_LIMIT)
        if not raw:
            return
        await on_line(
            "stdout" if name == "stdout" else "stderr", raw.decode(errors="replace").rstrip("\r\n")
        )


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), _KILL_GRACE_S)
    except TimeoutError:
        _kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
    # The leader is gone; what it started may still be on its way out (or ignore SIGTERM).
    # Nothing of the group outlives the agent: a stopped run leaves no process behind.
    _kill_group(proc.pid, signal.SIGKILL)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)

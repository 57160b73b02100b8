"""How asyncio learns that a child process ended: from a pidfd in the event loop, not a thread.

Python 3.11's default (ThreadedChildWatcher) starts a thread for every child process, only to
block in waitpid() for it. A worker starts three children a run (the checkout, the agent, the
diff), and those thread starts were ~6% of its event loop's samples in a drain (bench case
5). Linux (5.3+) gives a process file descriptor that becomes readable when the process ends:
the event loop waits on it like on a socket. Python 3.12 does this by itself; this is the same
watcher for 3.11, asking for the running loop at each child, so that it serves every loop
of the process (tests run several, one after another or in threads).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVarTuple, Unpack

log = logging.getLogger(__name__)

_Ts = TypeVarTuple("_Ts")


def install() -> bool:
    """Makes asyncio's subprocesses use pidfds where that is possible and not already so
    (Linux 5.3+, Python before 3.12). Returns whether this call installed it."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    if isinstance(asyncio.get_child_watcher(), _PidfdChildWatcher):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel before 5.3, or a seccomp profile that forbids the call
        return False
    asyncio.set_child_watcher(_PidfdChildWatcher())
    return True


if sys.version_info < (3, 12):

    class _PidfdChildWatcher(asyncio.AbstractChildWatcher):
        """Python 3.12's child watcher (asyncio/unix_events.py), in 3.11's interface."""

        def add_child_handler(
            self,
            pid: int,
            callback: Callable[[int, int, Unpack[_Ts]], object],
            *args: *_Ts,
        ) -> None:
            loop = asyncio.get_running_loop()
            pidfd = os.pidfd_open(pid)
            loop.add_reader(pidfd, self._do_wait, loop, pid, pidfd, callback, args)

        def _do_wait(
            self,
            loop: asyncio.AbstractEventLoop,
            pid: int,
            pidfd: int,
            callback: Callable[..., object],
            args: tuple[Any, ...],
        ) -> None:
            loop.remove_reader(pidfd)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:  # reaped by someone else's waitpid
                returncode = 255
                log.warning("child process %d: its exit status was read elsewhere", pid)
            else:
                returncode = os.waitstatus_to_exitcode(status)
            os.close(pidfd)
            callback(pid, returncode, *args)

        def remove_child_handler(self, pid: int) -> bool:
            return True  # nothing kept per child: the reader goes with its pidfd

        def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
            pass  # the running loop is asked at each child

        def close(self) -> None:
            pass

        def is_active(self) -> bool:
            return True

        def __enter__(self) -> _PidfdChildWatcher:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

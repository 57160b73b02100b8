"""asyncio's children reaped through pidfds: exit codes arrive, in any loop, without a thread."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from forgeline import child_watcher

pytestmark = pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12 uses pidfds itself")


@pytest.fixture(autouse=True)
def _installed() -> None:
    child_watcher.install()
    assert type(asyncio.get_child_watcher()).__name__ == "_PidfdChildWatcher"


async def _exit_codes_and_threads() -> tuple[list[int], int]:
    before = threading.active_count()
    children = [
        await asyncio.create_subprocess_exec("sh", "-c", f"read _; exit {code}", stdin=-1)
        for code in (0, 3, 7)
    ]
    during = threading.active_count() - before  # ThreadedChildWatcher: one more per child
    for child in children:
        assert child.stdin is not None
        child.stdin.close()
    return [await child.wait() for child in children], during


def test_exit_codes_arrive_and_no_thread_waits_for_a_child() -> None:
    codes, extra_threads = asyncio.run(_exit_codes_and_threads())
    assert codes == [0, 3, 7]
    assert extra_threads == 0


def test_serves_every_loop_of_the_process_one_after_another_and_at_once() -> None:
    assert asyncio.run(_exit_codes_and_threads())[0] == [0, 3, 7]
    results: list[list[int]] = []
    threads = [
        threading.Thread(target=lambda: results.append(asyncio.run(_exit_codes_and_threads())[0]))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [[0, 3, 7], [0, 3, 7]]


def test_a_killed_child_reports_its_signal() -> None:
    async def killed() -> int:
        child = await asyncio.create_subprocess_exec("sleep", "30")
        child.kill()
        return await child.wait()

    assert asyncio.run(killed()) == -9

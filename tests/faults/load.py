"""The load of a scenario: a few hundred requests, mostly fast shell agents, some slow ones and a
few that fail on purpose, submitted at a steady rate by a client that retries as a careful
client does: with the same Idempotency-Key, on 5xx and on transport errors, until it gets its
202 or gives up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.faults.stack import ADMIN_KEY

FAST, SLOW, FAILS = "fast", "slow", "fails"
GIVE_UP_S = 90.0  # a request not accepted by then is given up (and reported)


def kind_of(index: int) -> str:
    """70 % fast, 25 % slow (0.5 to 2 s), 5 % fail with exit code 3; the same for every run."""
    slot = index % 20
    return FAST if slot < 14 else SLOW if slot < 19 else FAILS


def script_for(index: int) -> str:
    kind = kind_of(index)
    if kind == FAST:
        return f"echo 'fast {index}' >> README.md\n"
    if kind == SLOW:
        return f"echo working\nsleep {0.5 + (index % 4) * 0.5}\necho 'slow {index}' >> README.md\n"
    return "echo 'failing on purpose' >&2\nexit 3\n"


@dataclass(frozen=True)
class Accepted:
    index: int
    request_id: str
    run_id: str
    kind: str
    tries: int  # HTTP attempts it took (1 = no retry)


@dataclass
class LoadResult:
    accepted: list[Accepted] = field(default_factory=list)
    given_up: list[tuple[int, str]] = field(default_factory=list)
    retries: int = 0  # HTTP attempts beyond the first, over all requests
    seconds: float = 0.0


class Load(threading.Thread):
    """Submits n requests at `rate` per second in a thread of its own (the scenario injects its
    fault meanwhile); result() waits for every request to be accepted or given up."""

    def __init__(
        self, url: str, repo: Path, n: int, *, rate: float, scenario: str, concurrency: int = 16
    ) -> None:
        super().__init__(name=f"load-{scenario}", daemon=True)
        self.url, self.repo, self.n, self.rate = url, repo, n, rate
        self.scenario = scenario
        self.concurrency = concurrency
        self.out = LoadResult()
        self._error: BaseException | None = None

    @property
    def accepted_so_far(self) -> int:
        return len(self.out.accepted)

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self, timeout: float = GIVE_UP_S + 120) -> LoadResult:
        self.join(timeout)
        assert not self.is_alive(), "the load did not finish"
        if self._error is not None:
            raise self._error
        return self.out

    async def _main(self) -> None:
        began = time.monotonic()
        gate = asyncio.Semaphore(self.concurrency)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=15) as client:
            tasks = []
            for index in range(self.n):
                await asyncio.sleep(max(0.0, began + index / self.rate - time.monotonic()))
                await gate.acquire()
                task = asyncio.create_task(self._submit(client, index))
                task.add_done_callback(lambda _: gate.release())
                tasks.append(task)
            await asyncio.gather(*tasks)
        self.out.seconds = time.monotonic() - began

    async def _submit(self, client: httpx.AsyncClient, index: int) -> None:
        body = {
            "repo": str(self.repo),
            "prompt": script_for(index),
            "agent": "shell",
            "labels": {"scenario": self.scenario, "kind": kind_of(index)},
        }
        key = {"Idempotency-Key": f"faults-{self.scenario}-{index}"}
        deadline = time.monotonic() + GIVE_UP_S
        tries, last = 0, ""
        while time.monotonic() < deadline:
            tries += 1
            try:
                response = await client.post("/v1/requests", json=body, headers=key)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 202:
                    ids = response.json()
                    self.out.accepted.append(
                        Accepted(index, ids["request_id"], ids["run_id"], kind_of(index), tries)
                    )
                    self.out.retries += tries - 1
                    return
                last = f"{response.status_code}: {response.text[:200]}"
                if response.status_code < 500 and response.status_code != 429:
                    break  # refused for good: a bug of the load or of the gateway
            await asyncio.sleep(min(2.0, 0.2 * tries))
        self.out.retries += tries - 1
        self.out.given_up.append((index, last))

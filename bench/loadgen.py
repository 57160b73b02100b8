"""An async HTTP load generator, bounded in count, in time and in requests in flight.

Two modes, both POSTing one JSON body to one URL over keep-alive connections on loopback:

- rate: an open loop at a fixed rate. A request's latency counts from the moment it was due,
  not from when it was sent, so a server (or this generator) falling behind shows as latency
  instead of silently sending less (no coordinated omission).
- closed: `concurrency` clients, each sending its next request when the last one answered;
  completed requests per second is the maximum throughput at that concurrency.

Run as `python -m bench.loadgen '<json spec>'` it prints a JSON result on stdout: the bench
runs it as a child process so that it never shares a GIL with what it measures.

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams (prebuilt request bytes,
Content-Length or chunked answers), not httpx: on this class of machine httpx spends about
2 ms of CPU per request (~350 requests/s from one core against an endpoint that does nothing,
where this client does ~1,200), so it would measure itself instead of the servers.
`client="httpx"` in the spec uses httpx anyway, for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.common import REPO_ROOT


@dataclass
class LoadSpec:
    url: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    mode: str = "rate"  # "rate" | "closed"
    rate: float = 100.0  # requests/s, mode rate
    concurrency: int = 16  # mode closed; for mode rate: at most this many in flight
    count: int = 1000
    max_seconds: float = 10.0
    warmup: int = 20
    timeout_s: float = 10.0
    client: str = "raw"  # "raw" | "httpx"


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, of 2xx answers
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # exceptions (timeouts, refused connections)
    error_types: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0  # from the first request due to the last answer
    sent: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def failures(self) -> str:
        bad = {k: v for k, v in self.statuses.items() if not k.startswith("2")}
        parts = [f"{v}x HTTP {k}" for k, v in sorted(bad.items())]
        for name, count in sorted(self.error_types.items()):
            parts.append(f"{count}x {name}")
        if self.errors and not self.error_types:
            parts.append(f"{self.errors}x error")
        return ", ".join(parts)


class RawClient:
    """POSTs one prebuilt request over a pool of keep-alive connections; returns statuses."""

    def __init__(self, url: str, payload: bytes, headers: dict[str, str], size: int) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        lines = [
            f"POST {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
            f"Host: {parts.netloc}",
            f"Content-Length: {len(payload)}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._size = size

    async def post(self) -> int:
        while self._idle:
            # A kept-alive connection the server closed meanwhile (uvicorn closes idle ones
            # after 5 s) fails before any answer: a real client retries on a new one.
            try:
                return await self._exchange(self._idle.pop())
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                if getattr(exc, "partial", b""):
                    raise
        return await self._exchange(await self._connect())

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> int:
        reader, writer = conn
        try:
            writer.write(self._request)
            status, keep = await _read_response(reader)
        except BaseException:
            writer.close()
            raise
        if keep and len(self._idle) < self._size:
            self._idle.append(conn)
        else:
            writer.close()
        return status

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self._host, self._port)

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip().lower()
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection") != "close"


class _HttpxClient:
    def __init__(self, spec: LoadSpec, payload: bytes) -> None:
        limits = httpx.Limits(
            max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency
        )
        self._client = httpx.AsyncClient(limits=limits, timeout=spec.timeout_s)
        self._spec, self._payload = spec, payload

    async def post(self) -> int:
        response = await self._client.post(
            self._spec.url, content=self._payload, headers=self._spec.headers
        )
        return response.status_code

    async def close(self) -> None:
        await self._client.aclose()


async def run_load(spec: LoadSpec) -> LoadResult:
    payload = json.dumps(spec.body).encode()
    headers = {"Content-Type": "application/json", **spec.headers}
    spec = LoadSpec(**{**asdict(spec), "headers": headers})
    result = LoadResult()
    loop = asyncio.get_running_loop()
    client: RawClient | _HttpxClient = (
        _HttpxClient(spec, payload)
        if spec.client == "httpx"
        else RawClient(spec.url, payload, headers, spec.concurrency)
    )
    try:
        # Warm-up, not measured: opens connections, fills caches, JITs nothing (CPython).
        warm = asyncio.Semaphore(min(spec.concurrency, 8))

        async def warm_one() -> None:
            async with warm:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.post(), spec.timeout_s)

        await asyncio.gather(*(warm_one() for _ in range(spec.warmup)))

        def record(status: int | None, latency: float, error: str = "") -> None:
            if status is None:
                result.errors += 1
                result.error_types[error] = result.error_types.get(error, 0) + 1
                return
            result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1
            if 200 <= status < 300:
                result.latencies.append(latency)

        async def one(due: float, slots: asyncio.Semaphore | None) -> float:
            status: int | None = None
            error = ""
            try:
                if slots is not None:
                    async with slots:
                        status = await asyncio.wait_for(client.post(), spec.timeout_s)
                else:
                    status = await asyncio.wait_for(client.post(), spec.timeout_s)
            except (
                OSError,
                TimeoutError,
                asyncio.IncompleteReadError,
                ValueError,
                httpx.HTTPError,
            ) as exc:
                status, error = None, type(exc).__name__
            done = loop.time()
            record(status, done - due, error)
            return done

        start = loop.time()
        last = start
        if spec.mode == "rate":
            slots = asyncio.Semaphore(spec.concurrency)
            tasks: list[asyncio.Task[float]] = []
            for i in range(spec.count):
                due = start + i / spec.rate
                if due - start > spec.max_seconds:
                    break
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(due, slots)))
            result.sent = len(tasks)
            done, pending = await asyncio.wait(tasks, timeout=spec.timeout_s + 5)
            for task in pending:
                task.cancel()
            result.errors += len(pending)
            last = max((t.result() for t in done if not t.exception()), default=start)
        else:
            deadline = start + spec.max_seconds
            counter = iter(range(spec.count))

            async def client_loop() -> float:
                finished = start
                for _ in counter:
                    if loop.time() > deadline:
                        break
                    result.sent += 1
                    finished = await one(loop.time(), None)
                return finished

            ends = await asyncio.gather(*(client_loop() for _ in range(spec.concurrency)))
            last = max(ends)
        result.elapsed = last - start
    finally:
        await client.close()
    return result


def run_in_child(spec: LoadSpec, env: dict[str, str] | None = None) -> LoadResult:
    """Runs the load from a child process; returns its result."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", json.dumps(asdict(spec))],
        capture_output=True,
        check=False,
        env=env,
        timeout=spec.max_seconds + spec.timeout_s + 120,
        cwd=str(REPO_ROOT),
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.decode()[-2000:]}")
    data = json.loads(out.stdout)
    return LoadResult(**data)


def main() -> int:
    spec = LoadSpec(**json.loads(sys.argv[1]))
    started = time.perf_counter()
    result = asyncio.run(run_load(spec))
    print(json.dumps(asdict(result)))
    print(f"loadgen: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

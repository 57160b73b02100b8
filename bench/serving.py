"""Serving a Starlette app from a bench child process, configured as Forgeline's gateway is.

Uvicorn on 127.0.0.1 (a port the OS picks), its own signal handling off, no access log, no
lifespan (forgeline/bootstrap.py does the same); `READY <port>` on stdout once it listens
(bench.common.Child waits for that line); SIGINT or SIGTERM stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette


class _QuietServer(uvicorn.Server):
    """Uvicorn without its own signal handling, as the gateway's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_until_signalled(app: Starlette) -> None:
    """Serves app until SIGINT or SIGTERM; returns once the server stopped."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False
    )
    server = _QuietServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
            return
        await asyncio.sleep(0.02)
    print(f"READY {server.servers[0].sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.should_exit = True
    await serving

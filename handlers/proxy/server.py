"""Serving the LLM proxy: on a TCP port of the host (local workspaces), or on a unix socket
that Docker workspaces reach through a bind mount (handlers/workspaces/llm_link.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from handlers.proxy.service import LlmProxy
from handlers.workspaces.llm_link import SOCKET_NAME


class ProxyListeners:
    """The proxy's listening sockets, bound at once: calls queue until it serves them."""

    def __init__(self, *, tcp: tuple[str, int] | None, socket_dir: Path | None) -> None:
        self.sockets: list[socket.socket] = []
        self.tcp_url: str | None = None
        self.socket_dir = socket_dir
        try:
            if tcp is not None:
                sock = _tcp_socket(*tcp)
                self.sockets.append(sock)
                host, port = sock.getsockname()[:2]
                self.tcp_url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            if socket_dir is not None:
                self.sockets.append(_unix_socket(socket_dir))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.socket_dir is not None:
            with contextlib.suppress(OSError):
                (self.socket_dir / SOCKET_NAME).unlink()


class _QuietServer(uvicorn.Server):
    """Uvicorn without its own signal handling: the process's stop event governs it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _tcp_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _unix_socket(directory: Path) -> socket.socket:
    directory.mkdir(parents=True, exist_ok=True)
    # The agent user of a workspace (uid 1000) connects to it; it still needs a run token.
    directory.chmod(0o755)
    path = directory / SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    os.chmod(path, 0o666)
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve_proxy(proxy: LlmProxy, listeners: ProxyListeners, stop: asyncio.Event) -> None:
    """Serves on the listeners until stop is set; then closes the proxy and the sockets."""
    config = uvicorn.Config(
        proxy.asgi(), log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=30
    )
    server = _QuietServer(config)
    serving = asyncio.create_task(server.serve(sockets=listeners.sockets))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            await serving
            raise RuntimeError("the LLM proxy stopped on its own")
    finally:
        stopping.cancel()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await serving
        await proxy.close()
        listeners.close()

"""The one way out of a Docker workspace whose agent calls a model: the LLM proxy's socket.

Such a workspace runs with network mode `none` (a loopback interface and nothing else). The
worker's proxy listens on a unix socket in a host folder that is bind-mounted read-only into the
container; a small forwarder started in the container listens on 127.0.0.1:FORWARDER_PORT and
pipes each connection to that socket. So agents use plain http://127.0.0.1:4141 URLs, and no
other host, port or container is reachable from the workspace: it has no route anywhere.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiodocker.containers import DockerContainer

from handlers.workspaces.base import WorkspaceError
from handlers.workspaces.docker_engine import AGENT_UID, engine_call

FORWARDER_PORT = 4141
MOUNT = "/run/forgeline-llm"  # where the proxy's socket folder appears in the container
SOCKET_NAME = "llm.sock"
PROXY_URL = f"http://127.0.0.1:{FORWARDER_PORT}"

# Runs in the workspace's python3. It binds before it forks, so the port accepts connections
# once the exec returns; the child lives on (adopted by the container's init) with its stdio
# closed, so the exec's output stream ends.
FORWARDER = """
import asyncio, os, socket, sys
port, path = int(sys.argv[1]), sys.argv[2]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(128)
if os.fork():
    os._exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)

async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except Exception:
        pass

async def handle(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(path)
    except OSError:
        writer.close()
        return
    try:
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    finally:
        writer.close()
        up_writer.close()

async def main():
    server = await asyncio.start_server(handle, sock=listener)
    await server.serve_forever()

asyncio.run(main())
"""


def isolate(config: dict[str, Any], socket_dir: Path | None) -> dict[str, Any]:
    """The container config of a workspace whose only network peer is the LLM proxy."""
    if socket_dir is None:
        raise WorkspaceError("this agent calls a model, but this worker runs no LLM proxy")
    host = dict(config["HostConfig"])
    host["NetworkMode"] = "none"
    host["Binds"] = [*host.get("Binds", []), f"{socket_dir}:{MOUNT}:ro"]
    return {**config, "NetworkDisabled": False, "HostConfig": host}


async def start_forwarder(container: DockerContainer) -> None:
    argv = ["python3", "-c", FORWARDER, str(FORWARDER_PORT), f"{MOUNT}/{SOCKET_NAME}"]
    async with engine_call("starting the LLM proxy link in the workspace"):
        execution = await container.exec(argv, user=str(AGENT_UID), stdout=True, stderr=True)
        output = bytearray()
        async with execution.start(detach=False) as stream:
            while (chunk := await stream.read_out()) is not None:
                output.extend(chunk.data)
        info = await execution.inspect()
        while info.get("Running"):  # the exit code appears once Running turns false
            await asyncio.sleep(0.02)
            info = await execution.inspect()
    if info.get("ExitCode") != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise WorkspaceError(f"the LLM proxy link did not start in the workspace: {tail[0]}")

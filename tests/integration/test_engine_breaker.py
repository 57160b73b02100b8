"""The engine breaker with the real Docker engine behind a socket proxy the test can cut
(kinder to the other tests on this machine than stopping dockerd): while the engine does not
answer, runs stay queued (not failed) and a probe asks every half second; once it answers
again, they all complete and no container is left behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from prometheus_client import REGISTRY

from domain.status import RunStatus
from tests.integration.conftest import eventually
from tests.integration.test_docker_workspaces import (  # noqa: F401
    deploy,
    docker,
    image,
    make_repo,
)

ENGINE_SOCKET = "/var/run/docker.sock"


class EngineProxy:
    """A unix socket forwarding to the engine's, until cut (every connection closed, new ones
    refused) and after it is restored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_unix_server(self._forward, path=str(self.path))

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(ENGINE_SOCKET)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[EngineProxy]:
    if not Path(ENGINE_SOCKET).exists():
        pytest.skip(f"no engine socket at {ENGINE_SOCKET}")
    engine = EngineProxy(Path(f"/tmp/fl-engine-{tmp_path.name[-20:]}.sock"))
    await engine.restore()
    yield engine
    await engine.cut()


def breaker_open() -> float:
    return REGISTRY.get_sample_value("forgeline_engine_breaker_open") or 0.0


async def test_runs_wait_queued_while_the_engine_is_away_and_complete_when_it_answers(
    proxy: EngineProxy,
    deploy: Callable[..., Any],  # noqa: F811
    docker: aiodocker.Docker,  # noqa: F811
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "repo")
    async with deploy(
        docker_url=f"unix://{proxy.path}",
        engine_breaker_threshold=2,
        engine_probe_interval_s=0.5,
        infra_backoff_s=0.2,
    ) as fl:
        await proxy.cut()
        runs = [await fl.submit(repo, f"echo run {n} > out.txt\n") for n in range(4)]
        await eventually(lambda: breaker_open() == 1, timeout=30, message="the breaker to open")

        # Paused: several probe intervals pass and every run is still queued, none failed.
        await asyncio.sleep(2)
        for run_id in runs:
            run = await fl.run(run_id)
            assert run.status is RunStatus.QUEUED, (run.status, run.error)
            assert run.infra_retries <= 2
        assert breaker_open() == 1

        await proxy.restore()
        for run_id in runs:
            run = await fl.wait_terminal(run_id, timeout=60)
            assert run.status is RunStatus.SUCCEEDED, (run.error, await fl.log(run_id))
            assert run.patch is not None and f"+run {runs.index(run_id)}" in run.patch
        assert breaker_open() == 0
        for run_id in runs:
            await fl.wait_no_container(run_id)

"""How the engine's refusals map to what the executor does: an engine restart under a run is an
infrastructure failure (the run is handed back and retried), a refusal of the request is not."""

from __future__ import annotations

import aiodocker
import pytest

from handlers.workspaces.base import WorkspaceError, WorkspaceUnavailable
from handlers.workspaces.docker_engine import engine_call


async def _raise_through_engine_call(status: int, message: str) -> None:
    async with engine_call("exec in the container"):
        raise aiodocker.DockerError(status, {"message": message})


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (409, "Container 3f2a is not running"),
        (500, "rpc error: code = Unavailable desc = grpc: the client connection is closing"),
        (500, "Container 0af8 is not running: Exited (143) Less than a second ago"),
        (500, "transport is closing: unavailable"),
        (900, "Cannot connect to Docker engine"),
    ],
)
async def test_an_engine_going_away_is_worth_retrying(status: int, message: str) -> None:
    with pytest.raises(WorkspaceUnavailable):
        await _raise_through_engine_call(status, message)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (404, "No such image: forgeline/workspace:nope"),
        (409, "Conflict. The container name is already in use"),
        (500, "invalid mount config"),
    ],
)
async def test_a_refused_request_is_a_workspace_failure(status: int, message: str) -> None:
    with pytest.raises(WorkspaceError) as raised:
        await _raise_through_engine_call(status, message)
    assert not isinstance(raised.value, WorkspaceUnavailable)
    assert message in str(raised.value)

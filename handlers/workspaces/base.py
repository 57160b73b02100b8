"""What every workspace provisioner offers: a checked-out repository to run an agent in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol
from uuid import UUID

LineSink = Callable[[Literal["stdout", "stderr"], str], Awaitable[None]]


class WorkspaceError(Exception):
    """Provisioning or using a workspace failed for a reason of the infrastructure."""


class WorkspaceUnavailable(WorkspaceError):
    """The workspace engine does not answer (e.g. Docker is down): worth retrying later."""


class RepoUnreachable(WorkspaceError):
    """The repository cannot be cloned, or the ref does not exist in it."""


class AgentTimedOut(Exception):
    """The agent ran past its timeout and was killed."""


class WorkspaceDiff(NamedTuple):
    diff: str
    numstat: str


@dataclass(frozen=True)
class WorkspaceSpec:
    run_id: UUID
    request_id: UUID
    repo: str
    # The commit to start from: a rerun pins the first run's base commit; else the ref.
    ref: str | None
    base_patch: str | None = None  # applied on top of ref before the agent runs (reruns)
    # The agent calls a model: the workspace may reach the LLM proxy, and nothing else.
    llm_proxy: bool = False


class Workspace(Protocol):
    @property
    def base_commit(self) -> str: ...

    async def write_scratch(self, name: str, content: str) -> str:
        """Writes a file outside the repository (it never shows in the patch); returns its path
        as the agent sees it."""
        ...

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        on_line: LineSink,
        timeout_s: float,
    ) -> int:
        """Runs argv in the repository root, streaming each output line; returns the exit code.
        Raises AgentTimedOut after killing it when timeout_s passes; cancelling the caller kills
        it too."""
        ...

    async def diff(self) -> WorkspaceDiff:
        """The change against base_commit as a binary-safe git diff, untracked files included,
        with its numstat for the patch summary."""
        ...

    async def stop_agent(self) -> None:
        """Kills whatever the agent left running, keeping the files (e.g. before the patch of
        a run stopped for its budget is taken)."""
        ...

    async def describe_exit(self, exit_code: int) -> str | None:
        """Why the agent ended with this code, when the workspace knows (e.g. out of memory)."""
        ...

    async def close(self) -> None:
        """Releases everything the workspace holds. Safe to call twice."""
        ...


class Provisioner(Protocol):
    name: str

    async def provision(self, spec: WorkspaceSpec) -> Workspace: ...

    async def close(self) -> None:
        """Waits for what it still does in the background for finished workspaces, so that
        none of it outlives the worker."""
        ...

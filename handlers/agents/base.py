"""What every agent adapter offers: run a prompt in a workspace, return the exit code."""

from __future__ import annotations

from typing import Any, Protocol

from handlers.workspaces.base import LineSink, Workspace

# What an agent's process sees of the host's environment: nothing secret, ever.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PYTHONDONTWRITEBYTECODE": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "Forgeline Agent",
    "GIT_AUTHOR_EMAIL": "agent@forgeline.invalid",
    "GIT_COMMITTER_NAME": "Forgeline Agent",
    "GIT_COMMITTER_EMAIL": "agent@forgeline.invalid",
}


class Agent(Protocol):
    name: str

    async def run(
        self,
        workspace: Workspace,
        *,
        prompt: str,
        options: dict[str, Any],
        on_line: LineSink,
        timeout_s: float,
    ) -> int: ...

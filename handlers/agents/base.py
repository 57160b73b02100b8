"""What every agent adapter offers: run a prompt in a workspace, return the exit code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from handlers.workspaces.base import LineSink, Workspace, WorkspaceError

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


@dataclass(frozen=True)
class LlmAccess:
    """How an LLM agent reaches a model: through Forgeline's LLM proxy, never the provider.

    The token is per run (it names the run and is worthless after it); the provider's real key
    stays in the proxy. Base URLs are as seen from inside the workspace.
    """

    openai_base_url: str  # OpenAI-compatible, ends in /v1 (chat/completions, responses)
    anthropic_base_url: str  # Anthropic-compatible (POST {base}/v1/messages)
    token: str

    def __repr__(self) -> str:  # never print the token
        return f"LlmAccess({self.openai_base_url!r}, {self.anthropic_base_url!r}, token=***)"


class Agent(Protocol):
    name: str
    # True when the agent calls a model: the run gets an LlmAccess (and a workspace whose only
    # reachable network peer is the proxy).
    needs_llm: bool

    async def run(
        self,
        workspace: Workspace,
        *,
        prompt: str,
        options: dict[str, Any],
        on_line: LineSink,
        timeout_s: float,
        llm: LlmAccess | None = None,
    ) -> int: ...


@dataclass(frozen=True)
class ReportedUsage:
    """The usage an agent printed about itself, to cross-check the proxy's metering."""

    input_tokens: int
    output_tokens: int
    cost_usd: float | None = None  # the agent's own estimate, when it prints one


def require_llm(agent: str, llm: LlmAccess | None) -> LlmAccess:
    if llm is None:
        raise WorkspaceError(f"agent {agent!r} calls a model but was given no LLM proxy access")
    return llm


def json_object(line: str) -> dict[str, Any]:
    """The JSON object an output line holds (agents print events as JSON lines); {} else."""
    if not line.startswith("{"):
        return {}
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

"""The catalogue of agents a request may name, with the options each accepts.

Pure data: the gateway validates against it, the handlers in handlers/agents/ implement it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AgentSpec:
    name: str
    description: str
    # JSON Schema of agent_options; additionalProperties is false unless stated.
    options_schema: dict[str, Any] = field(default_factory=dict)


SHELL = AgentSpec(
    name="shell",
    description="The prompt is a bash script, run in the repository's root inside the workspace.",
    options_schema={"type": "object", "properties": {}, "additionalProperties": False},
)

AGENTS: dict[str, AgentSpec] = {SHELL.name: SHELL}
DEFAULT_AGENT = SHELL.name

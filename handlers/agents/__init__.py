"""Agent adapters: one module each, behind handlers.agents.base.Agent."""

from __future__ import annotations

from handlers.agents.base import Agent
from handlers.agents.claude_code import ClaudeCodeAgent
from handlers.agents.codex import CodexAgent
from handlers.agents.command import CommandAgent
from handlers.agents.mini_swe_agent import MiniSweAgent
from handlers.agents.shell import ShellAgent


def all_agents() -> dict[str, Agent]:
    """Every agent of the catalogue (domain/agents.py), by name."""
    agents: list[Agent] = [
        ShellAgent(),
        CommandAgent(),
        MiniSweAgent(),
        CodexAgent(),
        ClaudeCodeAgent(),
    ]
    return {agent.name: agent for agent in agents}

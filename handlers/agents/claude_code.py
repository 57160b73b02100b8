"""Agent `claude-code`: Anthropic's Claude Code, `claude -p --output-format stream-json`.

ANTHROPIC_BASE_URL is the LLM proxy's Anthropic-compatible URL and ANTHROPIC_API_KEY the run's
token. Permission prompts are skipped (--dangerously-skip-permissions: nobody is there to
answer, and the workspace container is the sandbox; Claude Code refuses it only as root, and
workspaces run as uid 1000). Its side requests (titles, summaries) use the same model, so the
proxy prices and allows them like the rest; auto-update, telemetry and error reports are off
(the workspace reaches nothing but the proxy anyway). The prompt goes in on stdin. Its last
line, `{"type": "result", ...}`, holds the whole run's usage and its own cost estimate.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from typing import Any

from domain.agents import CLAUDE_CODE, ClaudeCodeOptions
from handlers.agents.base import BASE_ENV, LlmAccess, ReportedUsage, json_object, require_llm
from handlers.workspaces.base import LineSink, Workspace


class ClaudeCodeAgent:
    name = CLAUDE_CODE.name
    needs_llm = CLAUDE_CODE.needs_llm
    image_needs = ("claude", "rg")

    async def run(
        self,
        workspace: Workspace,
        *,
        prompt: str,
        options: dict[str, Any],
        on_line: LineSink,
        timeout_s: float,
        llm: LlmAccess | None = None,
    ) -> int:
        opts = CLAUDE_CODE.validate_options(options)
        assert isinstance(opts, ClaudeCodeOptions)
        access = require_llm(self.name, llm)
        prompt_file = await workspace.write_scratch("prompt.txt", prompt)
        script = await workspace.write_scratch(
            "claude.sh",
            "exec claude -p --output-format stream-json --verbose"
            " --dangerously-skip-permissions"
            f" --model {shlex.quote(opts.model)} --max-turns {opts.max_turns}"
            f" < {shlex.quote(prompt_file)}\n",
        )
        env = {
            **BASE_ENV,
            "ANTHROPIC_BASE_URL": access.anthropic_base_url,
            "ANTHROPIC_API_KEY": access.token,
            "ANTHROPIC_SMALL_FAST_MODEL": opts.model,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": opts.model,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
        }
        return await workspace.exec(["bash", script], env=env, on_line=on_line, timeout_s=timeout_s)

    def usage_from_output(self, lines: Iterable[str]) -> ReportedUsage | None:
        for line in lines:
            event = json_object(line)
            if event.get("type") == "result" and isinstance(event.get("usage"), dict):
                usage = event["usage"]
                input_tokens = sum(
                    usage.get(key) or 0
                    for key in (
                        "input_tokens",
                        "cache_creation_input_tokens",
                        "cache_read_input_tokens",
                    )
                )
                cost = event.get("total_cost_usd")
                return ReportedUsage(
                    input_tokens,
                    usage.get("output_tokens") or 0,
                    float(cost) if isinstance(cost, int | float) else None,
                )
        return None

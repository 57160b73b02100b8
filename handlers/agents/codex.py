"""Agent `codex`: OpenAI's Codex CLI, `codex exec --json`, non-interactive.

A model provider of its own, `forgeline`, points at the LLM proxy's OpenAI-compatible URL
(Responses API) with the run's token as its key; the config lives in a CODEX_HOME outside the
repository. Codex's own sandbox is off (--dangerously-bypass-approvals-and-sandbox): it needs
kernel features (user namespaces, landlock) a locked-down container does not grant, and the
workspace container is the sandbox. The prompt goes in on stdin (no argument size limit).
Its JSON events end each turn with `turn.completed` and the turn's usage.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from typing import Any

from domain.agents import CODEX, CodexOptions
from handlers.agents.base import BASE_ENV, LlmAccess, ReportedUsage, json_object, require_llm
from handlers.workspaces.base import LineSink, Workspace

TOKEN_VARIABLE = "FORGELINE_LLM_TOKEN"


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def codex_config(opts: CodexOptions, base_url: str) -> str:
    lines = [
        f"model = {_toml(opts.model)}",
        'model_provider = "forgeline"',
        "check_for_update_on_startup = false",
    ]
    if opts.reasoning_effort:
        lines.append(f"model_reasoning_effort = {_toml(opts.reasoning_effort)}")
    lines += [
        "",
        "[model_providers.forgeline]",
        'name = "Forgeline LLM proxy"',
        f"base_url = {_toml(base_url)}",
        f"env_key = {_toml(TOKEN_VARIABLE)}",
        'wire_api = "responses"',
        "",
    ]
    return "\n".join(lines)


class CodexAgent:
    name = CODEX.name
    needs_llm = CODEX.needs_llm
    image_needs = ("codex", "rg")

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
        opts = CODEX.validate_options(options)
        assert isinstance(opts, CodexOptions)
        access = require_llm(self.name, llm)
        config = await workspace.write_scratch(
            "codex-config.toml", codex_config(opts, access.openai_base_url)
        )
        prompt_file = await workspace.write_scratch("prompt.txt", prompt)
        home = config.rsplit("/", 1)[0] + "/codex-home"
        script = await workspace.write_scratch(
            "codex.sh",
            f"export CODEX_HOME={shlex.quote(home)}\n"
            'mkdir -p "$CODEX_HOME" || exit 1\n'
            f'cp {shlex.quote(config)} "$CODEX_HOME/config.toml" || exit 1\n'
            "exec codex exec --json --color never --ephemeral --skip-git-repo-check"
            f" --dangerously-bypass-approvals-and-sandbox - < {shlex.quote(prompt_file)}\n",
        )
        env = {**BASE_ENV, TOKEN_VARIABLE: access.token}
        return await workspace.exec(["bash", script], env=env, on_line=on_line, timeout_s=timeout_s)

    def usage_from_output(self, lines: Iterable[str]) -> ReportedUsage | None:
        seen, input_tokens, output_tokens = False, 0, 0
        for line in lines:
            event = json_object(line)
            if event.get("type") == "turn.completed" and isinstance(event.get("usage"), dict):
                seen = True
                input_tokens += event["usage"].get("input_tokens") or 0
                output_tokens += event["usage"].get("output_tokens") or 0
        return ReportedUsage(input_tokens, output_tokens) if seen else None

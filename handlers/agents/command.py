"""Agent `command`: any command-line agent, given as an argv template.

`{prompt}` in an argument becomes the prompt, `{prompt_file}` the path of a file holding it
(outside the repository, so it never shows in the patch; better for long prompts, as one
argument is capped at 128 KiB). No shell: the argv runs as it is, in the repository's root.
The CLI may call a model: it finds the LLM proxy in the usual variables (OPENAI_BASE_URL,
OPENAI_API_KEY, ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY), the key being the run's token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from domain.agents import COMMAND, PROMPT, PROMPT_FILE, CommandOptions
from handlers.agents.base import BASE_ENV, LlmAccess, ReportedUsage, require_llm
from handlers.workspaces.base import LineSink, Workspace


def llm_env(llm: LlmAccess) -> dict[str, str]:
    """The variables OpenAI's and Anthropic's SDKs (and most CLIs built on them) read."""
    return {
        "OPENAI_BASE_URL": llm.openai_base_url,
        "OPENAI_API_KEY": llm.token,
        "ANTHROPIC_BASE_URL": llm.anthropic_base_url,
        "ANTHROPIC_API_KEY": llm.token,
    }


class CommandAgent:
    name = COMMAND.name
    needs_llm = COMMAND.needs_llm
    image_needs: tuple[str, ...] = ()  # whatever argv names: your image must have it

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
        opts = COMMAND.validate_options(options)
        assert isinstance(opts, CommandOptions)
        access = require_llm(self.name, llm)
        prompt_file = ""
        if any(PROMPT_FILE in arg for arg in opts.argv):
            prompt_file = await workspace.write_scratch("prompt.txt", prompt)
        # {prompt_file} first: a prompt that itself says "{prompt_file}" stays as written.
        argv = [arg.replace(PROMPT_FILE, prompt_file).replace(PROMPT, prompt) for arg in opts.argv]
        env = {**BASE_ENV, **opts.env, **llm_env(access)}
        return await workspace.exec(argv, env=env, on_line=on_line, timeout_s=timeout_s)

    def usage_from_output(self, lines: Iterable[str]) -> ReportedUsage | None:
        return None  # an arbitrary CLI prints no usage we know how to read

"""Agent `shell`: the prompt is a bash script, run in the repository's root."""

from __future__ import annotations

from typing import Any

from handlers.agents.base import BASE_ENV, LlmAccess
from handlers.workspaces.base import LineSink, Workspace


class ShellAgent:
    name = "shell"
    needs_llm = False

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
        # The script lives outside the repository so it never shows in the patch, and is
        # passed as a file rather than argv, which caps one argument at 128 KiB.
        script = await workspace.write_scratch("prompt.sh", prompt)
        return await workspace.exec(
            ["bash", script], env=BASE_ENV, on_line=on_line, timeout_s=timeout_s
        )

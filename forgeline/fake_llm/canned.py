"""Ready-made scripts: what the demo, the docs and the tests have the fake model do."""

from __future__ import annotations

import shlex

from forgeline.fake_llm.script import Script, Shell, Turn

# mini-swe-agent ends its run when a command prints this line (its default configuration).
FINISH_COMMAND = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"


def edit_file_script(path: str, content: str, *, summary: str | None = None) -> Script:
    """Write content to path (relative to the repository root) with a shell command, then
    finish: mini-swe-agent by its finish command, Codex and Claude Code by a closing message.

    Every turn but the closing one needs tools, so an agent's side requests without tools
    (Claude Code asks for a title, for instance) get the closing message, not a command.
    """
    quoted = shlex.quote(path)
    write = f"mkdir -p \"$(dirname {quoted})\" && printf '%s' {shlex.quote(content)} > {quoted}"
    said = summary or f"I wrote {path}."
    return Script(
        turns=[
            Turn(text=f"I will write {path}.", actions=(Shell(write),), needs_tools=True),
            Turn(text=said, actions=(Shell(FINISH_COMMAND),), needs_tools=True),
        ],
        fallback=Turn(text=said),
    )

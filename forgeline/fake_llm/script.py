"""What the fake model says: a script of turns, written once, spoken in each protocol.

A turn is protocol-neutral (some text, some actions); the server renders it as an OpenAI chat
completion, an OpenAI Responses API response or an Anthropic message, whichever the client
asked for. `Shell` adapts to the tools the client offered (mini-swe-agent's `bash`, Codex's
`shell` / `shell_command` / `exec_command`, Claude Code's `Bash`), or becomes a fenced bash
block when the client offered none (text-based agents).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Shell:
    """Run a bash command, in whatever shape the client's tools take."""

    command: str
    fence: str = "mswea_bash_command"  # the code block's info string when no tool is offered


@dataclass(frozen=True)
class ToolCall:
    """A call of one named tool, as it is (arguments: a dict for function tools, a string for
    free-form "custom" tools of the Responses API such as Codex's apply_patch)."""

    name: str
    arguments: dict[str, Any] | str


Action = Shell | ToolCall


@dataclass(frozen=True)
class Turn:
    text: str = ""
    actions: tuple[Action, ...] = ()
    # None: estimated from the request and the reply (about 4 characters a token).
    input_tokens: int | None = None
    output_tokens: int | None = None
    # Only requests that offer tools take this turn (side requests of an agent, e.g. Claude
    # Code's title or quota checks, have none and get the fallback instead).
    needs_tools: bool = False


@dataclass
class Script:
    """Turn n answers a request whose history already holds n replies of the model.

    So the script is stateless: every conversation (every run, also many at once) walks it
    from the start, and a client that retries a request gets the same answer again.
    """

    turns: list[Turn] = field(default_factory=list)
    # Said when the turns are used up, or the turn does not fit the request.
    fallback: Turn = field(default_factory=lambda: Turn(text="Done."))

    def turn_for(self, depth: int, offers_tools: bool) -> Turn:
        if depth < len(self.turns):
            turn = self.turns[depth]
            if offers_tools or not turn.needs_tools:
                return turn
        return self.fallback

    # -- JSON form, for `python -m forgeline.fake_llm --script FILE` ------------------------

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Script:
        """{"turns": [{"text": "...", "actions": [{"shell": "cmd"} | {"tool": name,
        "arguments": ...}], "input_tokens"?, "output_tokens"?, "needs_tools"?}], "fallback"?}"""
        turns = [_turn_from_json(t) for t in data.get("turns", [])]
        script = cls(turns=turns)
        if "fallback" in data:
            script.fallback = _turn_from_json(data["fallback"])
        return script


def _turn_from_json(data: dict[str, Any]) -> Turn:
    actions: list[Action] = []
    for action in data.get("actions", []):
        if "shell" in action:
            actions.append(Shell(action["shell"], action.get("fence", "mswea_bash_command")))
        else:
            actions.append(ToolCall(action["tool"], action.get("arguments", {})))
    return Turn(
        text=data.get("text", ""),
        actions=tuple(actions),
        input_tokens=data.get("input_tokens"),
        output_tokens=data.get("output_tokens"),
        needs_tools=data.get("needs_tools", False),
    )


# -- rendering an action for the tools a client offered ----------------------------------------


def shell_call(command: str, tool_names: set[str]) -> ToolCall | None:
    """The tool call that runs command with one of the offered tools; None if none fits."""
    if "bash" in tool_names:  # mini-swe-agent
        return ToolCall("bash", {"command": command})
    if "Bash" in tool_names:  # Claude Code
        return ToolCall("Bash", {"command": command, "description": "Run a shell command"})
    if "shell_command" in tool_names:  # Codex: a command line for the user's shell
        return ToolCall("shell_command", {"command": command})
    if "exec_command" in tool_names:  # Codex: unified exec
        return ToolCall("exec_command", {"cmd": command})
    if "shell" in tool_names:  # Codex: argv
        return ToolCall("shell", {"command": ["bash", "-lc", command]})
    return None


def resolve(turn: Turn, tool_names: set[str]) -> tuple[str, list[ToolCall]]:
    """The turn's text and tool calls, given the tools the request offered."""
    text, calls = turn.text, []
    for action in turn.actions:
        if isinstance(action, ToolCall):
            calls.append(action)
        elif (call := shell_call(action.command, tool_names)) is not None:
            calls.append(call)
        else:
            block = f"```{action.fence}\n{action.command}\n```"
            text = f"{text}\n\n{block}" if text else block
    return text, calls


def arguments_json(call: ToolCall) -> str:
    return call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)

"""The catalogue of agents a request may name, with the options each accepts.

Pure data: the gateway validates against it (a bad `agent_options` is a 422 at submit time, not
a failed run), GET /v1/agents lists it, the adapters in handlers/agents/ read their options
through the same models. Each agent's options are a strict pydantic model: its JSON Schema is
what clients see, and validation is exactly that schema (no coercion, no extra keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# A model name as providers spell them: "gpt-5-mini", "claude-sonnet-4-5", "openai/gpt-4o".
ModelName = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
]
EnvName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
PROMPT, PROMPT_FILE = "{prompt}", "{prompt_file}"


class AgentOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ShellOptions(AgentOptions):
    pass


class CommandOptions(AgentOptions):
    argv: Annotated[
        list[Annotated[str, Field(max_length=4096)]], Field(min_length=1, max_length=64)
    ] = Field(
        description=f"the command line; `{PROMPT}` in an argument is replaced by the prompt, "
        f"`{PROMPT_FILE}` by the path of a file holding it (outside the repository). One of "
        "them must appear. Runs in the repository's root, without a shell.",
        examples=[["aider", "--yes-always", "--message-file", PROMPT_FILE]],
        json_schema_extra={"contains": {"type": "string", "pattern": r"\{prompt(_file)?\}"}},
    )
    env: dict[EnvName, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict,
        max_length=32,
        description="extra environment variables (never put secrets here: they are recorded "
        "in the request). OPENAI_BASE_URL, OPENAI_API_KEY, ANTHROPIC_BASE_URL and "
        "ANTHROPIC_API_KEY are set to the LLM proxy and the run's token.",
    )

    @field_validator("argv")
    @classmethod
    def _uses_the_prompt(cls, argv: list[str]) -> list[str]:
        if not any(PROMPT in arg or PROMPT_FILE in arg for arg in argv):
            raise ValueError(f"argv must contain {PROMPT} or {PROMPT_FILE}")
        return argv


class MiniSweAgentOptions(AgentOptions):
    model: ModelName = Field(
        default="gpt-5-mini",
        description="the model, as the configured provider names it (called through the "
        "proxy's OpenAI-compatible endpoint)",
    )
    step_limit: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=100, description="at most this many model calls (steps), then mini stops"
    )


class CodexOptions(AgentOptions):
    model: ModelName = Field(default="gpt-5", description="the model (Responses API)")
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        default=None, description="model_reasoning_effort; unset: Codex's default"
    )


class ClaudeCodeOptions(AgentOptions):
    model: ModelName = Field(default="claude-sonnet-4-5", description="the model")
    max_turns: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=100, description="at most this many agentic turns (--max-turns)"
    )


@dataclass(frozen=True)
class AgentSpec:
    name: str
    description: str
    options: type[AgentOptions]
    # True: the agent calls a model, through Forgeline's LLM proxy (docs/agents.md).
    needs_llm: bool = False

    @property
    def options_schema(self) -> dict[str, Any]:
        """JSON Schema of agent_options; additionalProperties is false."""
        return self.options.model_json_schema()

    def validate_options(self, options: dict[str, Any]) -> AgentOptions:
        """The options as the agent reads them; raises ValueError saying what is wrong."""
        try:
            return self.options.model_validate(options)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'agent_options'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ValueError(f"agent {self.name!r}: {problems}") from None


SHELL = AgentSpec(
    name="shell",
    description="The prompt is a bash script, run in the repository's root inside the workspace.",
    options=ShellOptions,
)
COMMAND = AgentSpec(
    name="command",
    description="Any command-line agent: agent_options.argv is its command line with the "
    "prompt substituted; it may call a model through the LLM proxy.",
    options=CommandOptions,
    needs_llm=True,
)
MINI_SWE_AGENT = AgentSpec(
    name="mini-swe-agent",
    description="mini-swe-agent (PyPI), non-interactive on the prompt in the repository's "
    "root, its model called through the LLM proxy (OpenAI-compatible).",
    options=MiniSweAgentOptions,
    needs_llm=True,
)
CODEX = AgentSpec(
    name="codex",
    description="OpenAI Codex CLI (npm @openai/codex), `codex exec --json`, its model called "
    "through the LLM proxy (Responses API).",
    options=CodexOptions,
    needs_llm=True,
)
CLAUDE_CODE = AgentSpec(
    name="claude-code",
    description="Claude Code (npm @anthropic-ai/claude-code), `claude -p` with stream-json "
    "output, its model called through the LLM proxy (Anthropic-compatible).",
    options=ClaudeCodeOptions,
    needs_llm=True,
)

AGENTS: dict[str, AgentSpec] = {
    spec.name: spec for spec in (SHELL, COMMAND, MINI_SWE_AGENT, CODEX, CLAUDE_CODE)
}
DEFAULT_AGENT = SHELL.name

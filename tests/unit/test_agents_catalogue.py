"""The agent catalogue and its adapters: options refused at submit, the usage each agent prints
read back, and no secret written into what an agent is given."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
from pydantic import ValidationError

from domain.agents import AGENTS, CodexOptions
from domain.commands import RequestSpec
from handlers.agents import all_agents
from handlers.agents.base import ReportedUsage
from handlers.agents.claude_code import ClaudeCodeAgent
from handlers.agents.codex import CodexAgent, codex_config
from handlers.agents.mini_swe_agent import MiniSweAgent


def test_every_agent_of_the_catalogue_has_an_adapter_that_agrees_on_needs_llm() -> None:
    adapters = all_agents()
    assert set(adapters) == set(AGENTS)
    for name, spec in AGENTS.items():
        assert adapters[name].needs_llm is spec.needs_llm, name
    assert {n for n, s in AGENTS.items() if s.needs_llm} == {
        "command",
        "mini-swe-agent",
        "codex",
        "claude-code",
    }


def refusal(agent: str, options: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as raised:
        RequestSpec(repo="/srv/repo", prompt="p", agent=agent, agent_options=options)
    (error,) = raised.value.errors(include_url=False)
    assert error["loc"] == ("agent_options",)
    return str(error["msg"])


@pytest.mark.parametrize(
    ("agent", "options", "said"),
    [
        ("shell", {"model": "x"}, "model: Extra inputs are not permitted"),
        ("codex", {"reasoning_effort": "extreme"}, "reasoning_effort"),
        ("codex", {"model": "gpt 5; rm -rf /"}, "model: String should match pattern"),
        ("claude-code", {"max_turns": "10"}, "max_turns: Input should be a valid integer"),
        ("claude-code", {"max_turns": 0}, "greater than or equal to 1"),
        ("mini-swe-agent", {"step_limit": True}, "step_limit: Input should be a valid integer"),
        ("command", {}, "argv: Field required"),
        ("command", {"argv": ["aider", "--yes"]}, "argv must contain {prompt} or {prompt_file}"),
        ("command", {"argv": ["x", "{prompt}"], "env": {"1BAD": "v"}}, "env.1BAD.[key]"),
    ],
)
def test_a_bad_option_is_refused_with_a_message_naming_it(
    agent: str, options: dict[str, Any], said: str
) -> None:
    message = refusal(agent, options)
    assert f"agent {agent!r}" in message
    assert said in message


def test_good_options_are_accepted_and_defaults_apply() -> None:
    spec = RequestSpec(
        repo="/srv/repo", prompt="p", agent="codex", agent_options={"model": "o4-mini"}
    )
    assert spec.agent_options == {"model": "o4-mini"}  # recorded as sent
    opts = AGENTS["codex"].validate_options(spec.agent_options)
    assert opts == CodexOptions(model="o4-mini", reasoning_effort=None)
    command = {"argv": ["aider", "--message-file", "{prompt_file}"], "env": {"AIDER_X": "1"}}
    RequestSpec(repo="/srv/repo", prompt="p", agent="command", agent_options=command)


def test_each_options_schema_is_closed_and_documents_its_fields() -> None:
    for spec in AGENTS.values():
        schema = spec.options_schema
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        for name, field in schema["properties"].items():
            assert field.get("description"), (spec.name, name)


def test_codex_config_points_at_the_proxy_and_names_only_the_token_variable() -> None:
    opts = CodexOptions(model="gpt-5.1@2025:x", reasoning_effort="high")
    config = tomllib.loads(codex_config(opts, "http://127.0.0.1:4141/openai/v1"))
    assert config["model"] == "gpt-5.1@2025:x" and config["model_reasoning_effort"] == "high"
    provider = config["model_providers"][config["model_provider"]]
    assert provider["base_url"] == "http://127.0.0.1:4141/openai/v1"
    assert provider["env_key"] == "FORGELINE_LLM_TOKEN"  # the token is in the env, not here
    assert provider["wire_api"] == "responses"


def test_usage_is_read_from_what_each_agent_prints() -> None:
    codex_lines = [
        "warning: something",
        json.dumps({"type": "turn.started"}),
        json.dumps({"type": "turn.completed", "usage": {"input_tokens": 100, "output_tokens": 7}}),
        json.dumps({"type": "turn.completed", "usage": {"input_tokens": 50, "output_tokens": 3}}),
    ]
    assert CodexAgent().usage_from_output(codex_lines) == ReportedUsage(150, 10)
    result = {
        "type": "result",
        "usage": {"input_tokens": 90, "cache_read_input_tokens": 10, "output_tokens": 4},
        "total_cost_usd": 0.0123,
    }
    claude_lines = ['{"type": "system"}', json.dumps(result)]
    assert ClaudeCodeAgent().usage_from_output(claude_lines) == ReportedUsage(100, 4, 0.0123)
    mini_lines = ["Saved trajectory", 'forgeline-usage: {"input_tokens": 9, "output_tokens": 2}']
    assert MiniSweAgent().usage_from_output(mini_lines) == ReportedUsage(9, 2)
    for agent in (CodexAgent(), ClaudeCodeAgent(), MiniSweAgent()):
        assert agent.usage_from_output(["nothing", "{not json"]) is None


def test_cli_options_are_json_when_they_parse_else_strings() -> None:
    from forgeline.client_commands import _option

    assert _option("step_limit=20") == ("step_limit", 20)
    assert _option("model=gpt-5") == ("model", "gpt-5")
    assert _option('argv=["aider", "{prompt_file}"]') == ("argv", ["aider", "{prompt_file}"])
    assert _option("env={}") == ("env", {})

"""Agent `mini-swe-agent`: `mini` (PyPI mini-swe-agent), non-interactive, on the prompt in the
repository's root; its model is called through litellm at the LLM proxy's OpenAI-compatible
URL, with the run's token as the key.

Its configuration is its default `mini.yaml` plus one file of ours (JSON, which is YAML): the
task, the model and its base URL, the step limit, no cost limit (the proxy's budget is the
limit). After mini ends, the usage of every model call in its trajectory is printed as one
`forgeline-usage: {...}` line, which usage_from_output() reads.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from typing import Any

from domain.agents import MINI_SWE_AGENT, MiniSweAgentOptions
from handlers.agents.base import BASE_ENV, LlmAccess, ReportedUsage, require_llm
from handlers.workspaces.base import LineSink, Workspace

USAGE_MARK = "forgeline-usage: "

# Sums the usage litellm recorded for each model call in mini's trajectory.
_SUMMARY = """
import json, sys
try:
    messages = json.load(open(sys.argv[1]))["messages"]
except (OSError, ValueError, KeyError):
    sys.exit(0)
total = {"input_tokens": 0, "output_tokens": 0, "calls": 0}
for message in messages:
    usage = ((message.get("extra") or {}).get("response") or {}).get("usage") or {}
    if usage:
        total["input_tokens"] += usage.get("prompt_tokens") or 0
        total["output_tokens"] += usage.get("completion_tokens") or 0
        total["calls"] += 1
print("forgeline-usage: " + json.dumps(total))
"""


class MiniSweAgent:
    name = MINI_SWE_AGENT.name
    needs_llm = MINI_SWE_AGENT.needs_llm
    image_needs = ("mini",)

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
        opts = MINI_SWE_AGENT.validate_options(options)
        assert isinstance(opts, MiniSweAgentOptions)
        access = require_llm(self.name, llm)
        # litellm: "openai/<name>" is any OpenAI-compatible server at api_base.
        model = opts.model if opts.model.startswith("openai/") else f"openai/{opts.model}"
        config = {
            "run": {"task": prompt},
            "model": {"model_name": model, "model_kwargs": {"api_base": access.openai_base_url}},
            "agent": {"step_limit": opts.step_limit, "cost_limit": 0},
        }
        config_path = await workspace.write_scratch(
            "mswea-forgeline.yaml", json.dumps(config, ensure_ascii=False)
        )
        trajectory = config_path.rsplit("/", 1)[0] + "/mswea-trajectory.json"
        summary = await workspace.write_scratch("mswea-usage.py", _SUMMARY)
        script = await workspace.write_scratch(
            "mini.sh",
            f"mini --yolo --exit-immediately -c mini.yaml -c {shlex.quote(config_path)} "
            f"-o {shlex.quote(trajectory)} </dev/null\n"
            "code=$?\n"
            f"python3 {shlex.quote(summary)} {shlex.quote(trajectory)}\n"
            "exit $code\n",
        )
        env = {
            **BASE_ENV,
            "OPENAI_API_KEY": access.token,
            "MSWEA_CONFIGURED": "true",  # no first-run setup wizard
            "MSWEA_SILENT_STARTUP": "1",
            # Offline (the workspace reaches only the proxy): litellm's bundled price list, and
            # a model it has no price for is no error (the proxy prices and meters calls).
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "MSWEA_COST_TRACKING": "ignore_errors",
            "HF_HUB_OFFLINE": "1",
        }
        return await workspace.exec(["bash", script], env=env, on_line=on_line, timeout_s=timeout_s)

    def usage_from_output(self, lines: Iterable[str]) -> ReportedUsage | None:
        for line in lines:
            if line.startswith(USAGE_MARK):
                total = json.loads(line[len(USAGE_MARK) :])
                return ReportedUsage(total["input_tokens"], total["output_tokens"])
        return None

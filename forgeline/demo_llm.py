"""The demo's LLM runs: an agent that calls a model through Forgeline's LLM proxy, against the
built-in fake model (forgeline/fake_llm: scripted, not a model, no key or network needed).

The agent is a few lines of stdlib python run by the `command` agent (so it runs in a Docker
workspace and in a local one alike): it asks the model for a shell command, runs it, reports
the output, until the model says it is done. The fake's script has it add a docstring to
greet(); each reply reports usage, which the proxy records on the run.
"""

from __future__ import annotations

import shlex
from typing import Any

from forgeline.fake_llm import FINISH_COMMAND, Script, Shell, Turn

LABEL = "fake model (built-in, scripted)"
DEMO_PRICES = {"fake": (2.5, 10.0)}  # USD per million tokens, input / output: gpt-4o's prices
# A stand-in for a provider's real key: the demo shows it reaches no record.
DEMO_UPSTREAM_KEY = "sk-demo-upstream-key-not-a-real-one"

DOCSTRING_VERSION = '''\
def greet(name: str) -> str:
    """The greeting for name, e.g. greet("Ada") == "Hello, Ada!"."""
    return f"Hello, {name}!"
'''

TASK = "Document greet() in greeting.py with a docstring that shows an example."

AGENT = r"""
import json, os, re, subprocess, sys, urllib.request
messages = [
    {"role": "system", "content": "Answer with one shell command in a mswea_bash_command block."},
    {"role": "user", "content": open(sys.argv[1]).read()},
]
for step in range(8):
    request = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions",
        data=json.dumps({"model": "fake-model", "messages": messages}).encode(),
        headers={"authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
                 "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        answer = json.load(reply)
    text = answer["choices"][0]["message"]["content"] or ""
    usage = answer["usage"]
    print(f"model says: {text.splitlines()[0]} "
          f"({usage['prompt_tokens']} tokens in, {usage['completion_tokens']} out)", flush=True)
    messages.append({"role": "assistant", "content": text})
    found = re.search(r"```mswea_bash_command\n(.*?)\n```", text, re.S)
    if not found or "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT" in found.group(1):
        print("agent: done", flush=True)
        break
    print("$ " + found.group(1), flush=True)
    done = subprocess.run(["bash", "-c", found.group(1)], capture_output=True, text=True)
    print(done.stdout + done.stderr, end="", flush=True)
    messages.append({"role": "user", "content": f"exit {done.returncode}\n{done.stdout}"})
"""


def fake_script() -> Script:
    write = f"printf '%s' {shlex.quote(DOCSTRING_VERSION)} > greeting.py"
    return Script(
        turns=[
            Turn(
                text="I will add a docstring to greet().",
                actions=(Shell(write),),
                input_tokens=1450,
                output_tokens=120,
            ),
            Turn(
                text="Done.", actions=(Shell(FINISH_COMMAND),), input_tokens=1720, output_tokens=30
            ),
        ],
        fallback=Turn(text="Done."),
    )


def llm_request(repo: str, **budget: Any) -> dict[str, Any]:
    """A request for the `command` agent running the demo's little LLM agent."""
    return {
        "repo": repo,
        "prompt": TASK,
        "agent": "command",
        "agent_options": {"argv": ["python3", "-c", AGENT, "{prompt_file}"]},
        "labels": {"demo": "1"},
        **budget,
    }


def mini_swe_agent_request(repo: str) -> dict[str, Any]:
    """The same task for the real mini-swe-agent CLI (Docker workspaces: it is in the image)."""
    return {
        "repo": repo,
        "prompt": TASK,
        "agent": "mini-swe-agent",
        "agent_options": {"model": "fake-model", "step_limit": 10},
        "labels": {"demo": "1"},
    }


def usage_line(run: dict[str, Any]) -> str:
    usage = run.get("usage")
    if not usage:
        return "no usage recorded"
    return (
        f"{usage['input_tokens']} tokens in, {usage['output_tokens']} out, "
        f"${usage['cost_usd']:.6f} at the demo's prices"
    )

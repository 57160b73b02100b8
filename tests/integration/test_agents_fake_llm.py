"""The scripted fake model provider speaks each protocol as its clients expect, reports usage
and remembers what it was sent (the agent tests and the LLM proxy's tests rely on it)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx

from forgeline.fake_llm import FakeUpstream, Script, Shell, ToolCall, Turn, edit_file_script

KEY = "sk-upstream-real-key"
BASH_TOOL = {"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}


def _events(text: str) -> list[Any]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


async def test_chat_completions_walk_the_script_by_conversation_depth() -> None:
    bearer = {"authorization": f"Bearer {KEY}"}
    fake = FakeUpstream(edit_file_script("a.txt", "hi\n"), api_key=KEY)
    async with fake, httpx.AsyncClient(base_url=fake.url, headers=bearer) as c:
        first = await c.post(
            "/v1/chat/completions",
            json={
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [BASH_TOOL],
            },
        )
        call = first.json()["choices"][0]["message"]["tool_calls"][0]["function"]
        assert call["name"] == "bash"
        assert "a.txt" in json.loads(call["arguments"])["command"]
        # Asked again with one reply of the model in the history: the second turn.
        history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        second = await c.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": history, "tools": [BASH_TOOL], "stream": True,
                  "stream_options": {"include_usage": True}},
        )  # fmt: skip
        chunks = _events(second.text)
    finish = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"]
              and c["choices"][0]["delta"].get("tool_calls")]  # fmt: skip
    assert "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT" in finish[0]["function"]["arguments"]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    one = first.json()["usage"]
    assert fake.usage_reported.input_tokens == one["prompt_tokens"] + usage[0]["prompt_tokens"]
    assert fake.usage_reported.output_tokens == (
        one["completion_tokens"] + usage[0]["completion_tokens"]
    )
    assert fake.usage_reported.replies == 2
    assert [r.headers["authorization"] for r in fake.model_requests()] == [f"Bearer {KEY}"] * 2


async def test_a_stream_without_include_usage_reports_none() -> None:
    fake = FakeUpstream(Script([Turn(text="hello")]))
    async with fake, httpx.AsyncClient(base_url=fake.url) as c:
        answer = await c.post(
            "/v1/chat/completions", json={"model": "m", "messages": [], "stream": True}
        )
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in
                   _events(answer.text) if c["choices"]) == "hello"  # fmt: skip
    assert fake.usage_reported.replies == 0


async def test_responses_api_streams_function_and_custom_tool_calls_with_usage() -> None:
    script = Script(
        [Turn(text="patching", actions=(Shell("ls"), ToolCall("apply_patch", "*** Begin Patch")))]
    )
    async with FakeUpstream(script) as fake, httpx.AsyncClient(base_url=fake.url) as c:
        tools = [
            {"type": "function", "name": "shell"},
            {"type": "custom", "name": "apply_patch"},
        ]
        answer = await c.post(
            "/v1/responses",
            json={"model": "m", "input": [{"role": "user", "content": "x"}], "tools": tools,
                  "stream": True},
        )  # fmt: skip
        plain = await c.post("/v1/responses", json={"model": "m", "input": "x"})
    events = _events(answer.text)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [i["type"] for i in done] == ["message", "function_call", "custom_tool_call"]
    assert json.loads(done[1]["arguments"]) == {"command": ["bash", "-lc", "ls"]}
    assert done[2]["input"] == "*** Begin Patch"
    completed = events[-1]
    assert completed["type"] == "response.completed"
    streamed = completed["response"]["usage"]
    plain_usage = plain.json()["usage"]
    assert (
        fake.usage_reported.input_tokens == streamed["input_tokens"] + plain_usage["input_tokens"]
    )
    assert fake.usage_reported.output_tokens == (
        streamed["output_tokens"] + plain_usage["output_tokens"]
    )


async def test_anthropic_messages_stream_tool_use_and_refuse_a_wrong_key() -> None:
    fake = FakeUpstream(edit_file_script("b.txt", "x"), api_key=KEY)
    async with fake, httpx.AsyncClient(base_url=fake.url) as c:
        wrong = await c.post("/v1/messages", headers={"x-api-key": "run-token"}, json={})
        body = {
            "model": "claude-x",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
            "stream": True,
        }
        answer = await c.post("/v1/messages", headers={"x-api-key": KEY}, json=body)
        # Without tools (a side request such as a title): the closing message, no command.
        side = await c.post(
            "/v1/messages",
            headers={"x-api-key": KEY},
            json={**body, "tools": [], "stream": False},
        )
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    events = _events(answer.text)
    start = next(e for e in events if e["type"] == "content_block_start" and
                 e["content_block"]["type"] == "tool_use")  # fmt: skip
    assert start["content_block"]["name"] == "Bash"
    partial = "".join(e["delta"].get("partial_json", "") for e in events
                      if e["type"] == "content_block_delta")  # fmt: skip
    assert "b.txt" in json.loads(partial)["command"]
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert side.json()["content"] == [{"type": "text", "text": "I wrote b.txt."}]
    message_start = events[0]["message"]["usage"]
    assert fake.usage_reported.input_tokens == (
        message_start["input_tokens"] + side.json()["usage"]["input_tokens"]
    )
    assert fake.usage_reported.output_tokens == (
        delta["usage"]["output_tokens"] + side.json()["usage"]["output_tokens"]
    )


def test_runs_as_a_process_and_prints_its_url() -> None:
    argv = [sys.executable, "-m", "forgeline.fake_llm", "--port", "0"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # blocks until it serves (pytest's timeout bounds it)
            url = first.split(" on ")[1].strip()
            models = httpx.get(f"{url}/v1/models", timeout=10).json()
            assert models["object"] == "list" and models["data"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)

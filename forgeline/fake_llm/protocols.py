"""A resolved turn written as each provider writes it: OpenAI chat completions, OpenAI
Responses, Anthropic messages; each as one JSON body or as server-sent events.

Shapes follow the providers' public API references closely enough for their official clients
(and litellm, Codex, Claude Code) to parse them; ids are random, times are now.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from forgeline.fake_llm.script import ToolCall, arguments_json


@dataclass(frozen=True)
class Reply:
    model: str
    text: str
    calls: list[ToolCall]
    input_tokens: int
    output_tokens: int


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


# -- OpenAI chat completions -------------------------------------------------------------------


def _chat_usage(reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.input_tokens,
        "completion_tokens": reply.output_tokens,
        "total_tokens": reply.input_tokens + reply.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _chat_tool_calls(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "id": _id("call_"),
            "type": "function",
            "function": {"name": c.name, "arguments": arguments_json(c)},
        }
        for c in reply.calls
    ]


def chat_completion(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.calls:
        message["tool_calls"] = _chat_tool_calls(reply)
    return {
        "id": _id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.calls else "stop",
            }
        ],
        "usage": _chat_usage(reply),
    }


def chat_completion_events(reply: Reply, include_usage: bool) -> Iterator[str]:
    """As OpenAI streams: role, content, tool calls, finish; usage only when asked for
    (stream_options.include_usage), in a last chunk without choices; then [DONE]."""
    base = {
        "id": _id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": reply.model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    for start in range(0, len(reply.text), 40):
        yield chunk({"content": reply.text[start : start + 40]})
    for index, call in enumerate(_chat_tool_calls(reply)):
        yield chunk({"tool_calls": [{"index": index, **call}]})
    yield chunk({}, "tool_calls" if reply.calls else "stop")
    if include_usage:
        yield sse({**base, "choices": [], "usage": _chat_usage(reply)})
    yield "data: [DONE]\n\n"


# -- OpenAI Responses --------------------------------------------------------------------------


def _response_items(reply: Reply) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if reply.text:
        items.append(
            {
                "type": "message",
                "id": _id("msg_"),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": reply.text, "annotations": []}],
            }
        )
    for call in reply.calls:
        if isinstance(call.arguments, str):  # a free-form ("custom") tool, e.g. apply_patch
            items.append(
                {
                    "type": "custom_tool_call",
                    "id": _id("ctc_"),
                    "status": "completed",
                    "call_id": _id("call_"),
                    "name": call.name,
                    "input": call.arguments,
                }
            )
        else:
            items.append(
                {
                    "type": "function_call",
                    "id": _id("fc_"),
                    "status": "completed",
                    "call_id": _id("call_"),
                    "name": call.name,
                    "arguments": arguments_json(call),
                }
            )
    return items


def _response(reply: Reply, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    done = status == "completed"
    return {
        "id": _id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": reply.model,
        "output": output,
        "usage": {
            "input_tokens": reply.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": reply.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": reply.input_tokens + reply.output_tokens,
        }
        if done
        else None,
    }


def response(reply: Reply) -> dict[str, Any]:
    return _response(reply, "completed", _response_items(reply))


def response_events(reply: Reply) -> Iterator[str]:
    """response.created, then per output item added / deltas / done, then response.completed
    (which carries the usage)."""
    seq = iter(range(1_000_000))
    items = _response_items(reply)
    final = _response(reply, "completed", items)
    started = {**_response(reply, "in_progress", []), "id": final["id"]}

    def event(kind: str, **data: Any) -> str:
        return sse({"type": kind, "sequence_number": next(seq), **data}, kind)

    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    for index, item in enumerate(items):
        yield event("response.output_item.added", output_index=index, item=_opened(item))
        if item["type"] == "message":
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": []}
            ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
            yield event("response.content_part.added", **ids, part=part)
            for start in range(0, len(text), 40):
                yield event("response.output_text.delta", **ids, delta=text[start : start + 40])
            yield event("response.output_text.done", **ids, text=text)
            yield event("response.content_part.done", **ids, part={**part, "text": text})
        elif item["type"] == "function_call":
            ids = {"item_id": item["id"], "output_index": index}
            yield event("response.function_call_arguments.delta", **ids, delta=item["arguments"])
            yield event("response.function_call_arguments.done", **ids, arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
    yield event("response.completed", response=final)


def _opened(item: dict[str, Any]) -> dict[str, Any]:
    if item["type"] == "message":
        return {**item, "status": "in_progress", "content": []}
    if item["type"] == "function_call":
        return {**item, "status": "in_progress", "arguments": ""}
    return {**item, "status": "in_progress", "input": ""}


# -- Anthropic messages ------------------------------------------------------------------------


def _anthropic_usage(reply: Reply, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": reply.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def _anthropic_blocks(reply: Reply) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if reply.text:
        blocks.append({"type": "text", "text": reply.text})
    for call in reply.calls:
        args = call.arguments if isinstance(call.arguments, dict) else {"input": call.arguments}
        blocks.append({"type": "tool_use", "id": _id("toolu_"), "name": call.name, "input": args})
    return blocks


def message(reply: Reply) -> dict[str, Any]:
    return {
        "id": _id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": _anthropic_blocks(reply),
        "stop_reason": "tool_use" if reply.calls else "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(reply, reply.output_tokens),
    }


def message_events(reply: Reply) -> Iterator[str]:
    """message_start (input usage), content blocks with their deltas, message_delta (the output
    usage, cumulative), message_stop."""
    whole = message(reply)
    start = {**whole, "content": [], "stop_reason": None, "usage": _anthropic_usage(reply, 1)}
    yield sse({"type": "message_start", "message": start}, "message_start")
    for index, block in enumerate(whole["content"]):
        if block["type"] == "text":
            opened: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [
                {"type": "text_delta", "text": block["text"][i : i + 40]}
                for i in range(0, len(block["text"]), 40)
            ]
        else:
            opened = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
        yield sse(
            {"type": "content_block_start", "index": index, "content_block": opened},
            "content_block_start",
        )
        for delta in deltas:
            yield sse(
                {"type": "content_block_delta", "index": index, "delta": delta},
                "content_block_delta",
            )
        yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
    yield sse(
        {
            "type": "message_delta",
            "delta": {"stop_reason": whole["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        },
        "message_delta",
    )
    yield sse({"type": "message_stop"}, "message_stop")

"""Reading the usage a provider reports in its replies, plain JSON or a server-sent event stream.

Three wire formats: OpenAI chat completions (`usage.prompt_tokens` / `completion_tokens`; in a
stream, the last chunk's `usage`, which the proxy asks for with `stream_options`), OpenAI
responses (`usage.input_tokens` / `output_tokens`; in a stream, the `response.completed`
event's response) and Anthropic messages (`usage.input_tokens` / `output_tokens`; in a stream,
`message_start` then cumulative `message_delta` counts). Cached prompt tokens count as input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Api = Literal["chat", "responses", "messages"]


@dataclass
class Usage:
    model: str
    input_tokens: int
    output_tokens: int


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _anthropic_input(usage: dict[str, Any]) -> int:
    # Anthropic reports cache reads and writes beside the uncached input; all are billed.
    return sum(
        _int(usage.get(name))
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


def from_body(api: Api, body: dict[str, Any], requested_model: str) -> Usage | None:
    """The usage of a non-streamed reply, or None when it reports none."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    reported = body.get("model")
    model = reported if isinstance(reported, str) and reported else requested_model
    if api == "chat":
        return Usage(model, _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")))
    if api == "responses":
        return Usage(model, _int(usage.get("input_tokens")), _int(usage.get("output_tokens")))
    return Usage(model, _anthropic_input(usage), _int(usage.get("output_tokens")))


class StreamMeter:
    """Fed the raw bytes of an event stream as they pass; knows the usage once it was sent."""

    def __init__(self, api: Api, requested_model: str) -> None:
        self._api = api
        self._buffer = b""
        self._model = requested_model
        self._input: int | None = None
        self._output: int | None = None

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        # Events end with a blank line; only whole `data:` lines are read, the rest waits.
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if line.startswith(b"data:"):
                self._data(line[5:].strip())

    @property
    def usage(self) -> Usage | None:
        if self._input is None and self._output is None:
            return None
        return Usage(self._model, self._input or 0, self._output or 0)

    def _data(self, payload: bytes) -> None:
        if not payload.startswith(b"{"):
            return  # e.g. "[DONE]"
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if isinstance(event, dict):
            {"chat": self._chat, "responses": self._responses, "messages": self._messages}[
                self._api
            ](event)

    def _take_model(self, holder: dict[str, Any]) -> None:
        if isinstance(holder.get("model"), str) and holder["model"]:
            self._model = holder["model"]

    def _chat(self, event: dict[str, Any]) -> None:
        self._take_model(event)
        usage = event.get("usage")
        if isinstance(usage, dict):
            self._input = _int(usage.get("prompt_tokens"))
            self._output = _int(usage.get("completion_tokens"))

    def _responses(self, event: dict[str, Any]) -> None:
        response = event.get("response")
        if not isinstance(response, dict):
            return
        self._take_model(response)
        usage = response.get("usage")
        # completed, incomplete and failed responses all carry the usage billed so far
        if isinstance(usage, dict):
            self._input = _int(usage.get("input_tokens"))
            self._output = _int(usage.get("output_tokens"))

    def _messages(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            self._take_model(message)
            usage = message.get("usage")
            if isinstance(usage, dict):
                self._input = _anthropic_input(usage)
                self._output = _int(usage.get("output_tokens"))
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            usage = event["usage"]
            # Counts in message_delta are cumulative: the last one is the total.
            if "output_tokens" in usage:
                self._output = _int(usage.get("output_tokens"))
            if any(name.endswith("input_tokens") for name in usage):
                self._input = max(self._input or 0, _anthropic_input(usage))

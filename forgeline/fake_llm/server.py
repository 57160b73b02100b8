"""A scripted fake model provider, OpenAI- and Anthropic-compatible, on a free port.

    async with FakeUpstream(script, api_key="sk-real") as fake:
        ...  # point a client (or Forgeline's LLM proxy) at fake.url
        fake.usage_reported   # the usage it put in its replies, totalled
        fake.requests         # every request it received: path, headers, JSON body

Endpoints: POST /v1/chat/completions, POST /v1/responses, POST /v1/messages (each streamed
as server-sent events when the body says "stream": true), POST /v1/messages/count_tokens,
GET /v1/models. With api_key set, a request without that key (Authorization: Bearer, or
x-api-key) is refused with 401, as a provider would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from forgeline.fake_llm import protocols
from forgeline.fake_llm.protocols import Reply
from forgeline.fake_llm.script import Script, Turn, resolve

Protocol = Literal["chat", "responses", "anthropic"]
MODELS = ("fake-model", "fake-small")


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # the parsed JSON, or None
    at: float  # time.time() when it arrived


@dataclass
class UsageTotals:
    input_tokens: int = 0
    output_tokens: int = 0
    replies: int = 0  # replies whose usage reached the client

    def add(self, reply: Reply) -> None:
        self.input_tokens += reply.input_tokens
        self.output_tokens += reply.output_tokens
        self.replies += 1


@dataclass
class FakeUpstream:
    script: Script = field(default_factory=Script)
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free one
    requests: list[ReceivedRequest] = field(default_factory=list)
    usage_reported: UsageTotals = field(default_factory=UsageTotals)
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The base URL, without /v1 (OpenAI clients add /v1 to it, Anthropic's add /v1/...)."""
        return f"http://{self.host}:{self.port}"

    def model_requests(self) -> list[ReceivedRequest]:
        """The requests that asked the model for a reply (not model lists or token counts)."""
        return [r for r in self.requests if r.method == "POST" and r.path in _MODEL_PATHS]

    async def __aenter__(self) -> FakeUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(), log_config=None, log_level="warning", access_log=False,
            lifespan="off", ws="none",
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._task.done() or time.monotonic() > deadline:
                sock.close()
                await self._task  # raises what stopped it
                raise RuntimeError("the fake upstream did not start within 10 s")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the HTTP application ------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self._count_tokens, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    async def _receive(self, request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(
            ReceivedRequest(
                request.method, request.url.path, dict(request.headers), body, time.time()
            )
        )
        return body

    def _refused(self, request: Request, protocol: Protocol) -> Response | None:
        if self.api_key is None:
            return None
        bearer = request.headers.get("authorization", "")
        if bearer == f"Bearer {self.api_key}" or request.headers.get("x-api-key") == self.api_key:
            return None
        message = "invalid API key (fake upstream)"
        if protocol == "anthropic":
            body = {
                "type": "error",
                "error": {"type": "authentication_error", "message": message},
            }
        else:
            body = {"error": {"message": message, "type": "invalid_request_error", "code": "x"}}
        return JSONResponse(body, status_code=401)

    async def _chat(self, request: Request) -> Response:
        body = await self._receive(request)
        if (refused := self._refused(request, "chat")) is not None:
            return refused
        if not isinstance(body, dict):
            return _bad_request("chat")
        names = {t.get("function", {}).get("name", "") for t in body.get("tools") or []}
        messages = body.get("messages") or []
        depth = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
        reply = self._reply(body, names, depth, messages)
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            events = protocols.chat_completion_events(reply, include)
            return self._stream(events, reply if include else None)
        self.usage_reported.add(reply)
        return JSONResponse(protocols.chat_completion(reply))

    async def _responses(self, request: Request) -> Response:
        body = await self._receive(request)
        if (refused := self._refused(request, "responses")) is not None:
            return refused
        if not isinstance(body, dict):
            return _bad_request("responses")
        names = {t.get("name") or t.get("type", "") for t in body.get("tools") or []}
        depth = _responses_depth(body.get("input"))
        reply = self._reply(body, names, depth, [body.get("instructions"), body.get("input")])
        if body.get("stream"):
            return self._stream(protocols.response_events(reply), reply)
        self.usage_reported.add(reply)
        return JSONResponse(protocols.response(reply))

    async def _messages(self, request: Request) -> Response:
        body = await self._receive(request)
        if (refused := self._refused(request, "anthropic")) is not None:
            return refused
        if not isinstance(body, dict):
            return _bad_request("anthropic")
        names = {t.get("name", "") for t in body.get("tools") or []}
        messages = body.get("messages") or []
        depth = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
        reply = self._reply(body, names, depth, [body.get("system"), messages])
        if body.get("stream"):
            return self._stream(protocols.message_events(reply), reply)
        self.usage_reported.add(reply)
        return JSONResponse(protocols.message(reply))

    async def _count_tokens(self, request: Request) -> Response:
        body = await self._receive(request)
        if (refused := self._refused(request, "anthropic")) is not None:
            return refused
        return JSONResponse({"input_tokens": _estimate(body)})

    async def _models(self, request: Request) -> Response:
        await self._receive(request)
        if "anthropic-version" in request.headers:
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in MODELS
            ]
            return JSONResponse(
                {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
            )
        listed = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in MODELS]
        return JSONResponse({"object": "list", "data": listed})

    def _reply(self, body: dict[str, Any], tool_names: set[str], depth: int, prompt: Any) -> Reply:
        turn: Turn = self.script.turn_for(depth, offers_tools=bool(tool_names - {""}))
        text, calls = resolve(turn, tool_names)
        said = len(text) + sum(len(json.dumps(c.arguments)) for c in calls)
        return Reply(
            model=str(body.get("model") or MODELS[0]),
            text=text,
            calls=calls,
            input_tokens=turn.input_tokens or _estimate(prompt),
            output_tokens=turn.output_tokens or max(1, said // 4),
        )

    def _stream(self, events: Iterator[str], counted: Reply | None) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            for event in events:
                yield event
            if counted is not None:  # its usage was in the stream
                self.usage_reported.add(counted)

        return StreamingResponse(body(), media_type="text/event-stream")


_MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/messages"})


_MODEL_ITEMS = frozenset(
    {"function_call", "custom_tool_call", "local_shell_call", "reasoning", "web_search_call"}
)


def _responses_depth(items: Any) -> int:
    """The model's earlier replies in a Responses input: runs of consecutive items of the
    model's (its messages, calls, reasoning); the client's items (user messages, call outputs)
    separate them."""
    if not isinstance(items, list):
        return 0
    depth, in_reply = 0, False
    for item in items:
        of_model = isinstance(item, dict) and (
            item.get("type") in _MODEL_ITEMS or item.get("role") == "assistant"
        )
        depth += of_model and not in_reply
        in_reply = of_model
    return depth


def _estimate(value: Any) -> int:
    """About 4 characters a token, as providers' rules of thumb say."""
    return max(1, len(json.dumps(value, default=str)) // 4)


def _bad_request(protocol: Protocol) -> Response:
    message = "the body must be a JSON object"
    if protocol == "anthropic":
        body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    else:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return JSONResponse(body, status_code=400)

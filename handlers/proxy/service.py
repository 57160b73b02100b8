"""The LLM proxy's HTTP service: authenticate the run, forward to the provider, meter usage.

Routes (as agents see them, under the base URL their LlmAccess names):
  POST /openai/v1/chat/completions, POST /openai/v1/responses     metered
  POST /anthropic/v1/messages                                      metered
  GET /openai/v1/models, GET /anthropic/v1/models, POST /anthropic/v1/messages/count_tokens
  GET /healthz (no token; the tests' probe)

The agent authenticates with its run's token (Authorization: Bearer, or x-api-key); the proxy
puts the provider's real key on the upstream request. Replies, streamed or not, pass through
as they come; the usage each reports is recorded on the run (Run.UsageRecorded). A run past its
budget gets 402 with code budget_exceeded; its worker stops the agent (handlers/run_attempt.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from eventsourcing.application import AggregateNotFoundError
from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from domain.application import Forgeline
from domain.run import Run
from domain.status import RunStatus
from handlers import log_context
from handlers.proxy.pricing import Prices
from handlers.proxy.tokens import RunToken, RunTokens
from handlers.proxy.usage import Api, StreamMeter, Usage, from_body
from handlers.store import decide_on_run_async, load_run

log = logging.getLogger(__name__)

Provider = Literal["openai", "anthropic"]

CALLS = Counter(
    "forgeline_llm_proxy_calls",
    "Model calls the LLM proxy of this process answered, by provider and outcome.",
    ["provider", "outcome"],
)
TOKENS = Counter(
    "forgeline_llm_proxy_tokens",
    "Tokens the upstream reported through the LLM proxy of this process.",
    ["provider", "direction"],
)

MAX_BODY_BYTES = 32 * 1024 * 1024  # a long agent conversation, images included
# Not forwarded upstream: the agent's token, and what the HTTP client sets itself.
_DROP_REQUEST = {
    "host",
    "authorization",
    "x-api-key",
    "content-length",
    "connection",
    "transfer-encoding",
    "accept-encoding",
    "cookie",
    "keep-alive",
    "te",
    "upgrade",
    "proxy-authorization",
}
_DROP_RESPONSE = {
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "set-cookie",
}
_PRINTABLE_MODEL = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class Upstream:
    """A provider: where it is and the real key. The key is never logged, printed or recorded."""

    base_url: str  # OpenAI: up to and with /v1; Anthropic: the root (…/v1/messages is appended)
    api_key: str = field(repr=False)


@dataclass(frozen=True)
class ProxyConfig:
    openai: Upstream | None
    anthropic: Upstream | None
    prices: Prices = field(default_factory=Prices)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0  # between two chunks of a reply: models think slowly


class ProxyRefused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(provider: Provider, status: int, code: str, message: str) -> JSONResponse:
    """An error in the provider's own shape, so the agent's SDK shows the message."""
    if provider == "anthropic":
        body: dict[str, Any] = {"type": "error", "error": {"type": code, "message": message}}
    else:
        body = {"error": {"message": message, "type": code, "code": code, "param": None}}
    return JSONResponse(body, status_code=status)


class LlmProxy:
    def __init__(self, app: Forgeline, tokens: RunTokens, config: ProxyConfig) -> None:
        self._app = app
        self._tokens = tokens
        self._config = config
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            follow_redirects=False,
        )
        self._recording: set[asyncio.Task[None]] = set()

    def asgi(self) -> Starlette:
        def post(path: str, provider: Provider, api: Api, upstream_path: str) -> Route:
            async def endpoint(request: Request) -> Response:
                return await self._call(request, provider, api, upstream_path)

            return Route(path, endpoint, methods=["POST"])

        def unmetered(path: str, method: str, provider: Provider, upstream_path: str) -> Route:
            async def endpoint(request: Request) -> Response:
                return await self._call(request, provider, None, upstream_path)

            return Route(path, endpoint, methods=[method])

        async def healthz(request: Request) -> Response:
            return JSONResponse({"status": "ok"})

        return Starlette(
            routes=[
                post("/openai/v1/chat/completions", "openai", "chat", "chat/completions"),
                post("/openai/v1/responses", "openai", "responses", "responses"),
                post("/anthropic/v1/messages", "anthropic", "messages", "v1/messages"),
                # Calls that cost nothing, which CLIs make beside their model calls.
                unmetered("/openai/v1/models", "GET", "openai", "models"),
                unmetered("/anthropic/v1/models", "GET", "anthropic", "v1/models"),
                unmetered(
                    "/anthropic/v1/messages/count_tokens",
                    "POST",
                    "anthropic",
                    "v1/messages/count_tokens",
                ),
                Route("/healthz", healthz, methods=["GET"]),
            ]
        )

    async def close(self) -> None:
        if self._recording:
            await asyncio.wait(list(self._recording), timeout=10)
        await self._client.aclose()

    # -- one call ------------------------------------------------------------------------

    async def _call(
        self, request: Request, provider: Provider, api: Api | None, upstream_path: str
    ) -> Response:
        try:
            token = await self._admit(request)
        except ProxyRefused as refused:
            CALLS.labels(provider, refused.code).inc()
            return _error(provider, refused.status, refused.code, refused.message)
        with log_context.bound(run_id=token.run_id):
            try:
                return await self._forward(request, provider, api, upstream_path, token)
            except ProxyRefused as refused:
                CALLS.labels(provider, refused.code).inc()
                return _error(provider, refused.status, refused.code, refused.message)

    async def _admit(self, request: Request) -> RunToken:
        presented = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        token = self._tokens.verify(presented) if presented else None
        if token is None:
            raise ProxyRefused(
                401, "invalid_token", "not a Forgeline run token (the LLM proxy takes no other key)"
            )
        try:
            run = await load_run(self._app, token.run_id)
        except AggregateNotFoundError:
            raise ProxyRefused(401, "invalid_token", "this token's run does not exist") from None
        except Exception as exc:
            log.warning("LLM proxy: the event store did not answer: %s", type(exc).__name__)
            raise ProxyRefused(
                503, "store_unavailable", "Forgeline's store did not answer; retry later"
            ) from None
        if run.status is not RunStatus.RUNNING or run.attempt != token.attempt:
            raise ProxyRefused(
                401, "token_expired", f"this token's run is {run.status.value}: it no longer works"
            )
        if run.over_budget:
            raise ProxyRefused(
                402, "budget_exceeded", f"the run's budget is spent ({run.budget_summary()})"
            )
        return token

    async def _forward(
        self,
        request: Request,
        provider: Provider,
        api: Api | None,
        upstream_path: str,
        token: RunToken,
    ) -> Response:
        upstream = self._config.openai if provider == "openai" else self._config.anthropic
        if upstream is None:
            raise ProxyRefused(
                503,
                "upstream_not_configured",
                f"no {provider} provider is configured in Forgeline "
                f"(FORGELINE_LLM_{provider.upper()}_API_KEY)",
            )
        body, model = await self._read_body(request, api)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        headers["accept-encoding"] = "identity"  # the proxy reads the usage in the reply
        if provider == "openai":
            headers["authorization"] = f"Bearer {upstream.api_key}"
        else:
            headers["x-api-key"] = upstream.api_key
        url = f"{upstream.base_url.rstrip('/')}/{upstream_path}"
        outgoing = self._client.build_request(
            request.method, url, headers=headers, content=body, params=request.query_params
        )
        try:
            reply = await self._client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            log.warning("LLM proxy: %s upstream unreachable: %s", provider, type(exc).__name__)
            raise ProxyRefused(
                502, "upstream_unreachable", f"the {provider} provider did not answer"
            ) from None
        reply_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP_RESPONSE}
        CALLS.labels(provider, str(reply.status_code)).inc()
        content_type = reply.headers.get("content-type", "")
        if api is not None and reply.status_code < 300 and "text/event-stream" in content_type:
            meter = StreamMeter(api, model)
            return StreamingResponse(
                self._relay(reply, meter, provider, token),
                status_code=reply.status_code,
                headers=reply_headers,
            )
        try:
            raw = await reply.aread()
        finally:
            await reply.aclose()
        if api is not None and reply.status_code < 300:
            usage = _usage_of(api, raw, model)
            self._record(provider, token, usage)
        return Response(raw, status_code=reply.status_code, headers=reply_headers)

    async def _read_body(self, request: Request, api: Api | None) -> tuple[bytes, str]:
        """The request body to forward, and the model asked for."""
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ProxyRefused(413, "request_too_large", "the request body is too large")
        raw = b"".join(chunks)
        if api is None:
            return raw, ""
        try:
            body = json.loads(raw)
        except ValueError:
            raise ProxyRefused(400, "invalid_json", "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ProxyRefused(400, "invalid_json", "the request body must be a JSON object")
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        if api == "chat" and body.get("stream") is True:
            # Streamed chat completions report usage only when asked: always ask, so that no
            # call escapes the meter (the extra last chunk has no choices; SDKs expect that).
            options = body.get("stream_options")
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            raw = json.dumps(body).encode()
        return raw, str(model)

    async def _relay(
        self, reply: httpx.Response, meter: StreamMeter, provider: Provider, token: RunToken
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in reply.aiter_raw():
                meter.feed(chunk)
                yield chunk
        finally:
            await reply.aclose()
            # Also when the agent hung up mid-stream: what was reported so far was spent.
            self._record(provider, token, meter.usage)

    # -- metering ------------------------------------------------------------------------

    def _record(self, provider: Provider, token: RunToken, usage: Usage | None) -> None:
        """Records the call's usage on the run, in a task of its own: a reply the agent
        abandons (its stream cancelled) is still metered."""
        if usage is None:
            log.warning("LLM proxy: a %s reply reported no usage; nothing recorded", provider)
            return
        task = asyncio.create_task(self._save_usage(provider, token, usage))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _save_usage(self, provider: Provider, token: RunToken, usage: Usage) -> None:
        model = _PRINTABLE_MODEL.sub("?", usage.model)[:200] or "unknown"
        cost = self._config.prices.cost_usd(model, usage.input_tokens, usage.output_tokens)
        TOKENS.labels(provider, "input").inc(usage.input_tokens)
        TOKENS.labels(provider, "output").inc(usage.output_tokens)

        def decide(run: Run) -> None:
            run.record_usage(
                provider=provider,
                model=model,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_usd=cost,
            )

        with log_context.bound(run_id=token.run_id):
            try:
                await decide_on_run_async(self._app, token.run_id, decide)
            except Exception:
                log.exception("LLM proxy: could not record the usage of run %s", token.run_id)

    async def wait_recorded(self) -> None:
        """Waits until every usage seen so far is in the store (tests, shutdown)."""
        while self._recording:
            await asyncio.wait(list(self._recording))


def _usage_of(api: Api, raw: bytes, model: str) -> Usage | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return from_body(api, body, model) if isinstance(body, dict) else None

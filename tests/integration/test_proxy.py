"""The LLM proxy against the scripted fake provider and a real store: what an agent gets back,
what is recorded on its run, who is refused, and where the provider's key never shows up."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import httpx
import pytest
import uvicorn
from nats.js import JetStreamContext
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import StreamingResponse
from starlette.routing import Route

from domain.application import Forgeline
from domain.commands import RequestSpec
from domain.request import Request
from domain.run import Run
from forgeline.bootstrap import open_store
from forgeline.fake_llm import FakeUpstream, Script, Turn
from handlers.proxy.pricing import Prices
from handlers.proxy.server import ProxyListeners, serve_proxy
from handlers.proxy.service import LlmProxy, ProxyConfig, Upstream
from handlers.proxy.tokens import RunTokens
from handlers.store import decide_on_run_async, load_run
from tests.support.secrets_scan import scan_database, scan_streams

UPSTREAM_KEY = "sk-upstream-" + secrets.token_hex(16)  # the provider's real key
TURN = Turn(text="ok", input_tokens=1200, output_tokens=34)
PRICES = Prices(table={"fake": (2.0, 8.0)}, fallback=(2.0, 8.0))  # USD per million tokens


@dataclass
class Proxied:
    url: str
    tokens: RunTokens
    proxy: LlmProxy
    fake: FakeUpstream


@asynccontextmanager
async def running_proxy(app: Forgeline) -> AsyncIterator[Proxied]:
    async with FakeUpstream(Script(fallback=TURN), api_key=UPSTREAM_KEY) as fake:
        tokens = RunTokens(secrets.token_bytes(32))
        config = ProxyConfig(
            openai=Upstream(f"{fake.url}/v1", UPSTREAM_KEY),
            anthropic=Upstream(fake.url, UPSTREAM_KEY),
            prices=PRICES,
        )
        proxy = LlmProxy(app, tokens, config)
        listeners = ProxyListeners(tcp=("127.0.0.1", 0), socket_dir=None)
        stop = asyncio.Event()
        serving = asyncio.create_task(serve_proxy(proxy, listeners, stop))
        assert listeners.tcp_url is not None
        try:
            yield Proxied(listeners.tcp_url, tokens, proxy, fake)
        finally:
            stop.set()
            await serving


@pytest.fixture
async def proxied(store: Forgeline) -> AsyncIterator[Proxied]:
    async with running_proxy(store) as p:
        yield p


def running_run(app: Forgeline, **budget: Any) -> Run:
    """A request's run as a worker holds it while its agent runs (attempt 1)."""
    spec = RequestSpec(repo="/srv/repo", prompt="fix it", **budget)
    request, run = Request.submit(
        request_id=uuid4(), run_id=uuid4(), spec=spec, command_id=f"c-{uuid4()}"
    )
    run.start_provisioning("worker-1")
    run.record_workspace("docker", "a" * 40)
    run.start()
    app.save(request, run)
    return run


def chat(stream: bool) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    }


CALLS = {
    "chat": ("/openai/v1/chat/completions", chat(False)),
    "chat-stream": ("/openai/v1/chat/completions", chat(True)),
    "responses": ("/openai/v1/responses", {"model": "fake-model", "input": "hi"}),
    "responses-stream": (
        "/openai/v1/responses",
        {"model": "fake-model", "input": "hi", "stream": True},
    ),
    "messages": (
        "/anthropic/v1/messages",
        {"model": "fake-model", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
    ),
    "messages-stream": (
        "/anthropic/v1/messages",
        {
            "model": "fake-model",
            "max_tokens": 100,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ),
}


async def call(
    p: Proxied, name: str, token: str, *, anthropic_header: bool = False
) -> httpx.Response:
    path, body = CALLS[name]
    headers = {"x-api-key": token} if anthropic_header else {"authorization": f"Bearer {token}"}
    if not token:
        headers = {}
    if path.startswith("/anthropic"):
        headers["anthropic-version"] = "2023-06-01"
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as client:
        return await client.post(path, json=body, headers=headers)


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_usage_recorded_is_what_the_provider_reported(
    store: Forgeline, proxied: Proxied, name: str
) -> None:
    run = running_run(store)
    token = proxied.tokens.mint(run.id, 1)
    reply = await call(proxied, name, token, anthropic_header=name.startswith("messages"))
    assert reply.status_code == 200, reply.text
    if name.endswith("stream"):
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert "data:" in reply.text
    else:
        assert reply.json()["usage"]  # the reply passed through, usage and all
    await proxied.proxy.wait_recorded()

    reported = proxied.fake.usage_reported
    assert reported.replies == 1
    after = await load_run(store, run.id)
    assert (after.input_tokens, after.output_tokens) == (
        reported.input_tokens,
        reported.output_tokens,
    )
    assert (after.input_tokens, after.output_tokens) == (1200, 34)
    assert after.cost_usd == pytest.approx((1200 * 2.0 + 34 * 8.0) / 1e6)
    # The provider saw its real key, never the run's token.
    seen = proxied.fake.model_requests()[-1].headers
    assert UPSTREAM_KEY in (seen.get("authorization", "") + seen.get("x-api-key", ""))
    assert token not in json.dumps(seen)


async def test_streamed_chat_is_asked_for_its_usage(store: Forgeline, proxied: Proxied) -> None:
    run = running_run(store)
    reply = await call(proxied, "chat-stream", proxied.tokens.mint(run.id, 1))
    assert reply.status_code == 200
    sent = proxied.fake.model_requests()[-1].body
    assert sent["stream_options"] == {"include_usage": True}


async def test_usage_adds_up_over_calls(store: Forgeline, proxied: Proxied) -> None:
    run = running_run(store)
    token = proxied.tokens.mint(run.id, 1)
    replies = await asyncio.gather(*(call(proxied, name, token) for name in sorted(CALLS)))
    assert [r.status_code for r in replies] == [200] * len(CALLS)
    await proxied.proxy.wait_recorded()
    after = await load_run(store, run.id)
    assert after.model_calls == len(CALLS)
    assert after.input_tokens == proxied.fake.usage_reported.input_tokens == 1200 * len(CALLS)


@pytest.mark.parametrize(
    "token",
    ["", "sk-not-ours", "flrun_0123_1_AAAA", "Bearer"],
    ids=["none", "foreign", "forged", "word"],
)
async def test_a_token_not_minted_here_is_refused(
    store: Forgeline, proxied: Proxied, token: str
) -> None:
    reply = await call(proxied, "chat", token)
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_token"
    assert proxied.fake.model_requests() == []


async def test_a_token_from_another_secret_is_refused(store: Forgeline, proxied: Proxied) -> None:
    run = running_run(store)
    forged = RunTokens(secrets.token_bytes(32)).mint(run.id, 1)
    reply = await call(proxied, "messages", forged, anthropic_header=True)
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "invalid_token"  # Anthropic's error shape
    assert proxied.fake.model_requests() == []


async def test_a_token_dies_with_its_run_and_its_attempt(
    store: Forgeline, proxied: Proxied
) -> None:
    run = running_run(store)
    token = proxied.tokens.mint(run.id, 1)
    assert (await call(proxied, "chat", token)).status_code == 200
    await decide_on_run_async(store, run.id, lambda r: r.requeue("worker lost"))
    stale = await call(proxied, "chat", token)  # the attempt was handed back
    assert stale.status_code == 401
    assert stale.json()["error"]["code"] == "token_expired"

    other = running_run(store)
    token = proxied.tokens.mint(other.id, 1)
    await decide_on_run_async(store, other.id, lambda r: r.succeed(0))
    ended = await call(proxied, "chat", token)
    assert ended.status_code == 401
    assert "succeeded" in ended.json()["error"]["message"]
    assert len(proxied.fake.model_requests()) == 1


async def test_a_run_past_its_budget_is_refused_further_calls(
    store: Forgeline, proxied: Proxied
) -> None:
    run = running_run(store, max_tokens=2000)
    token = proxied.tokens.mint(run.id, 1)
    assert (await call(proxied, "chat", token)).status_code == 200  # 1234 tokens
    await proxied.proxy.wait_recorded()
    assert (await call(proxied, "chat-stream", token)).status_code == 200  # 2468: crossed
    await proxied.proxy.wait_recorded()
    assert (await load_run(store, run.id)).over_budget

    refused = await call(proxied, "chat", token)
    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert "2468 of 2000 tokens" in refused.json()["error"]["message"]
    assert len(proxied.fake.model_requests()) == 2

    dollars = running_run(store, budget_usd=0.003)  # 0.002672 a call
    token = proxied.tokens.mint(dollars.id, 1)
    assert (await call(proxied, "responses", token)).status_code == 200
    await proxied.proxy.wait_recorded()
    assert (await call(proxied, "responses", token)).status_code == 200
    await proxied.proxy.wait_recorded()
    assert (await call(proxied, "messages", token)).status_code == 402


async def test_unconfigured_provider_and_unreachable_provider(store: Forgeline) -> None:
    run = running_run(store)
    tokens = RunTokens(secrets.token_bytes(32))
    config = ProxyConfig(openai=None, anthropic=Upstream("http://127.0.0.1:9", UPSTREAM_KEY))
    proxy = LlmProxy(store, tokens, config)
    listeners = ProxyListeners(tcp=("127.0.0.1", 0), socket_dir=None)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_proxy(proxy, listeners, stop))
    try:
        assert listeners.tcp_url is not None
        p = Proxied(listeners.tcp_url, tokens, proxy, FakeUpstream())
        none = await call(p, "chat", tokens.mint(run.id, 1))
        assert none.status_code == 503
        assert "FORGELINE_LLM_OPENAI_API_KEY" in none.json()["error"]["message"]
        down = await call(p, "messages", tokens.mint(run.id, 1))
        assert down.status_code == 502
        assert UPSTREAM_KEY not in down.text
    finally:
        stop.set()
        await serving


async def test_the_provider_key_is_nowhere_in_the_store_or_the_streams(
    store: Forgeline, proxied: Proxied, database_url: str, js: JetStreamContext
) -> None:
    run = running_run(store, budget_usd=1.0)
    token = proxied.tokens.mint(run.id, 1)
    for name in sorted(CALLS):
        assert (await call(proxied, name, token)).status_code == 200
    await proxied.proxy.wait_recorded()
    assert (await load_run(store, run.id)).model_calls == len(CALLS)

    leaks = scan_database(database_url, UPSTREAM_KEY) + await scan_streams(js, UPSTREAM_KEY)
    assert leaks == []
    assert scan_database(database_url, "sk-upstream-") == []
    # The scanner does find what is there (it is no blind test): the run's prompt.
    assert scan_database(database_url, "fix it")


async def test_a_stream_passes_through_as_it_comes(store: Forgeline) -> None:
    """The first event reaches the agent while the provider still holds back the rest."""
    release = asyncio.Event()

    async def held_stream(request: StarletteRequest) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"model": "fake", "choices": [{"delta": {"content": "first"}}]}\n\n'
            await release.wait()
            last = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
            yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    upstream_app = Starlette(routes=[Route("/v1/chat/completions", held_stream, methods=["POST"])])
    upstream = uvicorn.Server(uvicorn.Config(upstream_app, log_level="warning", lifespan="off"))
    listener = ProxyListeners(tcp=("127.0.0.1", 0), socket_dir=None)  # only for a free socket
    sock = listener.sockets[0]
    serving_upstream = asyncio.create_task(upstream.serve(sockets=[sock]))
    run = running_run(store)
    tokens = RunTokens(secrets.token_bytes(32))
    config = ProxyConfig(openai=Upstream(f"{listener.tcp_url}/v1", UPSTREAM_KEY), anthropic=None)
    proxy = LlmProxy(store, tokens, config)
    listeners = ProxyListeners(tcp=("127.0.0.1", 0), socket_dir=None)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_proxy(proxy, listeners, stop))
    try:
        headers = {"authorization": f"Bearer {tokens.mint(run.id, 1)}"}
        async with (
            httpx.AsyncClient(base_url=str(listeners.tcp_url), timeout=10) as client,
            client.stream(
                "POST", "/openai/v1/chat/completions", json=chat(True), headers=headers
            ) as reply,
        ):
            chunks = reply.aiter_raw()
            first = await asyncio.wait_for(anext(chunks), 5)
            assert b"first" in first and not release.is_set()
            release.set()
            rest = b"".join([chunk async for chunk in chunks])
        assert b"[DONE]" in rest
        await proxy.wait_recorded()
        after = await load_run(store, run.id)
        assert (after.input_tokens, after.output_tokens) == (10, 2)
    finally:
        stop.set()
        await serving
        upstream.should_exit = True
        await serving_upstream
        listener.close()


async def test_the_scan_reads_encrypted_states_too(database_url: str) -> None:
    """With encryption at rest the key is looked for in each decrypted state as well."""
    cipher_key = SecretStr(base64.b64encode(secrets.token_bytes(32)).decode())
    app = await asyncio.to_thread(open_store, database_url, cipher_key)
    try:
        async with running_proxy(app) as p:
            run = running_run(app)
            assert (await call(p, "messages-stream", p.tokens.mint(run.id, 1))).status_code == 200
            await p.proxy.wait_recorded()
        assert (await load_run(app, run.id)).model_calls == 1
    finally:
        app.close()
    assert scan_database(database_url, UPSTREAM_KEY, cipher_key) == []
    decoded = scan_database(database_url, "fix it", cipher_key)
    assert decoded and all("decoded state" in where for where in decoded)  # not in raw rows

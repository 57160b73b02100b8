"""Wiring the LLM proxy into a worker: its secret, its upstreams, where it listens, and what
the executor hands LLM agents (docs/llm-proxy.md)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg

from domain.application import Forgeline
from forgeline.settings import Settings
from handlers.proxy.access import LlmGrants
from handlers.proxy.pricing import DEFAULT_PRICES, Prices
from handlers.proxy.server import ProxyListeners, serve_proxy
from handlers.proxy.service import LlmProxy, ProxyConfig, Upstream
from handlers.proxy.tokens import RunTokens
from handlers.workspaces.llm_link import PROXY_URL
from projections.schema import SCHEMA_LOCK_KEY


def proxy_secret(database_url: str) -> bytes:
    """The installation's key for run tokens, made once and kept in its database: every
    worker's proxy verifies every worker's tokens."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS forgeline_llm_proxy_secret (id int PRIMARY KEY"
            " CHECK (id = 1), secret bytea NOT NULL, created_at timestamptz NOT NULL"
            " DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO forgeline_llm_proxy_secret (id, secret) VALUES (1, %s)"
            " ON CONFLICT (id) DO NOTHING",
            (secrets.token_bytes(32),),
        )
        row = conn.execute("SELECT secret FROM forgeline_llm_proxy_secret").fetchone()
    assert row is not None
    return bytes(row[0])


def proxy_config(settings: Settings) -> ProxyConfig:
    def upstream(base_url: str, key: object) -> Upstream | None:
        secret = key.get_secret_value() if key is not None else ""  # type: ignore[attr-defined]
        return Upstream(base_url, secret) if secret else None

    return ProxyConfig(
        openai=upstream(settings.llm_openai_base_url, settings.llm_openai_api_key),
        anthropic=upstream(settings.llm_anthropic_base_url, settings.llm_anthropic_api_key),
        prices=Prices(
            table=settings.llm_prices if settings.llm_prices is not None else DEFAULT_PRICES,
            fallback=settings.llm_fallback_price,
        ),
    )


def describe(config: ProxyConfig) -> str:
    offered = [
        f"{name} at {upstream.base_url}"
        for name, upstream in (("openai", config.openai), ("anthropic", config.anthropic))
        if upstream is not None
    ]
    return ", ".join(offered) or "no provider configured (FORGELINE_LLM_*_API_KEY)"


def _socket_dir(settings: Settings) -> Path:
    """A folder of this worker's own, with a short path (a unix socket's is at most 107 bytes)."""
    if settings.llm_proxy_socket_dir is None:
        return Path(tempfile.mkdtemp(prefix="fl-llm-", dir="/tmp"))
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.worker_name)[:64].lstrip(".") or "worker"
    folder = settings.llm_proxy_socket_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class WorkerLlmProxy:
    """The proxy of one worker process: made before the workspaces (Docker workspaces mount
    its socket folder), listening once the provisioner is known."""

    proxy: LlmProxy
    tokens: RunTokens
    socket_dir: Path  # short, under /tmp: unix socket paths are limited to 108 bytes
    description: str
    settings: Settings
    listeners: ProxyListeners | None = None
    grants: LlmGrants | None = None

    @classmethod
    def create(cls, settings: Settings, app: Forgeline, database_url: str) -> WorkerLlmProxy:
        tokens = RunTokens(proxy_secret(database_url))
        config = proxy_config(settings)
        socket_dir = _socket_dir(settings)
        return cls(LlmProxy(app, tokens, config), tokens, socket_dir, describe(config), settings)

    def listen(self, provisioner: str) -> LlmGrants:
        """Binds where this provisioner's workspaces reach the proxy; what agents are given."""
        if provisioner == "docker":
            self.listeners = ProxyListeners(tcp=None, socket_dir=self.socket_dir)
            base_url = PROXY_URL  # the forwarder inside each workspace
        else:
            host, port = self.settings.llm_proxy_host, self.settings.llm_proxy_port
            self.listeners = ProxyListeners(tcp=(host, port), socket_dir=None)
            assert self.listeners.tcp_url is not None
            base_url = self.listeners.tcp_url
        self.grants = LlmGrants(self.tokens, base_url)
        return self.grants

    async def serve(self, stop: asyncio.Event) -> None:
        assert self.listeners is not None, "listen() first"
        await serve_proxy(self.proxy, self.listeners, stop)

    async def close(self) -> None:
        """Stops what serve() did not (a worker that failed to start); safe to call twice."""
        await self.proxy.close()
        if self.listeners is not None:
            self.listeners.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.socket_dir)

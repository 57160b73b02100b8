"""The `forgeline` command: servers (up, gateway, worker, relay, projector), the demo, and the
client commands that talk HTTP to a gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from forgeline import client_commands, image_commands, keys_commands, store_commands
from forgeline.logging_setup import configure_logging
from forgeline.settings import Settings
from forgeline.startup import ALL_ROLES
from forgeline.worker_processes import PARENT_PID_ENV, stop_when_parent_exits

if TYPE_CHECKING:
    from forgeline.bootstrap import Servers


log = logging.getLogger("forgeline")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"forgeline: invalid setting: {exc}", file=sys.stderr)
        return 2
    # An extra worker process (forgeline/worker_processes.py) shares its parent's stderr.
    extra = os.environ.get(PARENT_PID_ENV)
    _configure_logging(settings.log_level, settings.worker_name if extra else None)
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgeline",
        description="Run coding agents in isolated workspaces; get reviewable patches back.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start everything (embedded NATS and Postgres by default)")
    _server_flags(up)
    up.set_defaults(handler=_up, roles=ALL_ROLES)
    for role, text in [
        ("gateway", "run only the HTTP gateway"),
        ("worker", "run only a worker (command handler and executor)"),
        ("relay", "run only the relay (event store -> FORGELINE_EVENTS)"),
        ("projector", "run only the projector (event store -> read tables)"),
    ]:
        p = sub.add_parser(role, help=text)
        _server_flags(p)
        p.set_defaults(handler=_up, roles=frozenset({role}))

    demo = sub.add_parser("demo", help="run sample requests on a sample repo, show the patches")
    demo.add_argument("--data-dir", type=Path, help="keep the demo's data here (default: temp)")
    demo.set_defaults(handler=_demo)

    client_commands.add_parsers(sub)
    image_commands.add_parsers(sub)
    keys_commands.add_parsers(sub)
    store_commands.add_parsers(sub)
    return parser


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="embedded servers' data (FORGELINE_DATA_DIR)")
    p.add_argument("--host", help="address the gateway listens on (FORGELINE_HOST)")
    p.add_argument("--port", type=int, help="port the gateway listens on (FORGELINE_PORT)")
    p.add_argument(
        "--metrics-port", type=int, help="serve this process's /metrics (FORGELINE_METRICS_PORT)"
    )


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        key: value
        for key in ("data_dir", "host", "port", "metrics_port")
        if (value := getattr(args, key, None)) is not None
    }
    return Settings(**overrides)


def _configure_logging(level: str, process: str | None = None) -> None:
    configure_logging(level, process=process)  # text, or JSON with FORGELINE_LOG_FORMAT=json


# Server commands import the whole system lazily: client commands start fast without it.
def _up(args: argparse.Namespace, settings: Settings) -> int:
    roles: frozenset[str] = args.roles
    if roles != ALL_ROLES and not (settings.nats_url and settings.database_url):
        print(
            f"forgeline {next(iter(roles))}: a single role needs external servers; set "
            "FORGELINE_NATS_URL and FORGELINE_DATABASE_URL (or run `forgeline up`).",
            file=sys.stderr,
        )
        return 2
    from forgeline.bootstrap import running_servers
    from forgeline.embedded import EmbeddedServerError
    from forgeline.startup import StartupError
    from forgeline.tracing import TracingConfigError, start_tracing
    from handlers.workspaces.base import WorkspaceError

    try:
        start_tracing(roles)  # only with an OTLP endpoint in OTEL_* (docs/observability.md)
    except TracingConfigError as exc:
        print(f"forgeline: invalid setting: {exc}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with running_servers(settings, progress=lambda m: print(m, file=sys.stderr)) as servers:
            return asyncio.run(_serve(settings, servers, roles))
    except (StartupError, EmbeddedServerError, WorkspaceError) as exc:
        print(f"forgeline: cannot start: {exc}", file=sys.stderr)
        return 1


async def _serve(settings: Settings, servers: Servers, roles: frozenset[str]) -> int:
    from forgeline.bootstrap import run_services

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parent = os.environ.get(PARENT_PID_ENV)  # an extra worker process of another one
    watch = asyncio.create_task(stop_when_parent_exits(int(parent), stop)) if parent else None

    status: dict[str, str] = {}
    first_key: list[str] = []

    def ready(port: int) -> None:
        if watch is None:  # the process that started an extra worker has shown its banner
            _print_banner(settings, servers, roles, port, status, first_key)

    try:
        await run_services(
            settings,
            servers,
            stop,
            roles,
            on_ready=ready,
            status=status,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            on_first_key=first_key.append,
        )
    finally:
        if watch is not None:
            watch.cancel()
    print("forgeline: stopped cleanly", file=sys.stderr)
    return 0


def _print_banner(
    settings: Settings,
    servers: Servers,
    roles: frozenset[str],
    port: int,
    status: dict[str, str],
    first_key: list[str],
) -> None:
    lines = ["", f"Forgeline is up ({', '.join(sorted(roles))})"]
    if "gateway" in roles:
        lines.append(f"  Web UI     http://{settings.host}:{port}/  (log in with an API key)")
        lines.append(f"  API        http://{settings.host}:{port}/v1  (docs: /docs, /openapi.json)")
        if first_key:
            # The one time this secret is shown: it is stored hashed, never logged.
            lines.append(f"  admin key  {first_key[0]}")
            lines.append(
                "             shown this once: keep it (export FORGELINE_API_KEY=...); "
                "`forgeline keys create` makes more"
            )
        elif settings.admin_key is not None:
            lines.append("  admin key  FORGELINE_ADMIN_KEY")
        else:
            lines.append("  API keys   send FORGELINE_API_KEY; `forgeline keys create|list|revoke`")
    lines.append(f"  data dir   {settings.data_dir}")
    lines.append(
        f"  NATS       {servers.nats_url}" + (" (embedded)" if "nats" in servers.embedded else "")
    )
    lines.append("  Postgres   " + ("embedded" if "postgres" in servers.embedded else "external"))
    workspaces = status.get("workspaces", "")
    if "worker" in roles:
        slots = f"{settings.worker_slots} slot(s)"
        if settings.worker_processes > 1:
            slots += f" in {settings.worker_processes} worker processes"
        lines.append(f"  workspaces {workspaces}, {slots}")
        if workspaces.startswith("local"):
            lines.append(
                "  WARNING    local workspaces are NOT isolated: agents run as this user on this"
                " machine. Use them only for trusted agents, or start a Docker engine."
            )
        lines.append(f"  LLM proxy  {status.get('llm_proxy', '?')} (docs/llm-proxy.md)")
    lines.append("Press Ctrl-C to stop.")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from forgeline.demo import run_demo

    return int(run_demo(args.data_dir))


if __name__ == "__main__":
    sys.exit(main())

"""`forgeline keys create|list|revoke`: API keys, managed in the store itself.

Store-level commands, like audit and verify: they reach Postgres through FORGELINE_DATABASE_URL
or the embedded Postgres of FORGELINE_DATA_DIR / --data-dir (reused when `forgeline up` runs,
else started for the command), never through the gateway, so they work without any key: they
are how a lost admin key is replaced. Over HTTP, an admin key does the same at /v1/keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from forgeline.settings import Settings

T = TypeVar("T")


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("keys", help="API keys: create, list, revoke (in the store)")
    actions = p.add_subparsers(dest="keys_action", required=True, metavar="ACTION")

    c = actions.add_parser(
        "create", help="make a key; prints its secret once (on stdout, alone on its line)"
    )
    c.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    c.add_argument(
        "--project",
        action="append",
        default=[],
        dest="projects",
        metavar="P",
        help="limit the key to requests labelled project=P (repeatable; not for admin)",
    )
    c.add_argument("--name", default="", help="who or what holds the key")
    _store_flags(c)
    c.set_defaults(handler=_create)

    ls = actions.add_parser("list", help="every key, without secrets")
    ls.add_argument("--json", action="store_true", help="print the keys as JSON")
    _store_flags(ls)
    ls.set_defaults(handler=_list)

    r = actions.add_parser(
        "revoke", help="revoke a key by id (gateways refuse it within FORGELINE_API_KEY_CACHE_S)"
    )
    r.add_argument("id", help="the key's id (key_...), as `forgeline keys list` shows")
    _store_flags(r)
    r.set_defaults(handler=_revoke)


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", type=Path, help="the embedded Postgres' data dir (FORGELINE_DATA_DIR)"
    )


def _with_keys(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Runs work(connection) against the store's keys table (made if missing)."""
    from forgeline.store_commands import store_database

    async def run(url: str) -> T:
        import psycopg

        from gateway import keys

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await keys.create_table(conn)
            return await work(conn)

    with store_database(settings) as url:
        return asyncio.run(run(url))


def _guarded(
    command: Callable[[argparse.Namespace, Settings], int],
) -> Callable[[argparse.Namespace, Settings], int]:
    def wrapper(args: argparse.Namespace, settings: Settings) -> int:
        import psycopg

        from forgeline.embedded import EmbeddedServerError
        from forgeline.store_commands import StoreUnavailable

        try:
            return command(args, settings)
        except (StoreUnavailable, EmbeddedServerError) as exc:
            _err().print(f"[red]error:[/red] {exc}", markup=True)
            return 2
        except psycopg.Error as exc:
            _err().print(f"[red]error:[/red] the store refused: {exc}", markup=True)
            return 1

    return wrapper


@_guarded
def _create(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import keys

    try:
        spec = keys.KeySpec(role=args.role, projects=args.projects, name=args.name)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            _err().print(f"[red]error:[/red] {error['msg']}", markup=True)
        return 2
    key, secret = _with_keys(settings, lambda conn: keys.create_key(conn, spec))
    scope = f", projects {', '.join(key.projects)}" if key.projects else ""
    _err().print(
        f"created {key.id} ({key.role.value}{scope}{', ' + key.name if key.name else ''}); "
        "its secret is shown this once, below: keep it",
        markup=False,
    )
    # The secret alone on stdout: KEY=$(forgeline keys create --role viewer) works.
    sys.stdout.write(secret + "\n")
    sys.stdout.flush()
    return 0


@_guarded
def _list(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import keys

    items = _with_keys(settings, keys.list_keys)
    if args.json:
        sys.stdout.write(json.dumps([key.as_json() for key in items], indent=2) + "\n")
        return 0
    table = Table("id", "name", "role", "projects", "created", "last used", "revoked")
    for key in items:
        table.add_row(
            key.id,
            key.name,
            key.role.value,
            ", ".join(key.projects) or "(all)",
            _when(key.created_at),
            _when(key.last_used_at),
            _when(key.revoked_at),
        )
    _out().print(table)
    return 0


@_guarded
def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import keys

    async def revoke(conn: Any) -> tuple[Any, Any]:
        before = await keys.get_key(conn, args.id)
        return before, await keys.revoke_key(conn, args.id)

    before, after = _with_keys(settings, revoke)
    if after is None:
        _err().print(
            f"[red]error:[/red] no key with id {args.id} (see `forgeline keys list`)", markup=True
        )
        return 1
    if before is not None and before.revoked_at is not None:
        _out().print(f"{after.id} was revoked already, at {_when(after.revoked_at)}")
    else:
        _out().print(f"revoked {after.id} ({after.name or after.role.value})")
    return 0


def _when(value: Any) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else ""

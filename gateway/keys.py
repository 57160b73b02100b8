"""API keys: random secrets stored only as digests, with a role and optional projects.

A key is `fl_` + 32 random bytes (urlsafe base64), shown once when it is made. The table keeps
its sha256 (a fast digest is enough for a secret of 256 random bits: there is nothing to guess
from it), its public id, a name, the role, the projects and its dates. A key is found by its
digest (unique index), then the digests are compared in constant time. Revoking keeps the row
(events name keys by id, so the id stays explainable); a revoked key never authenticates again
(after at most the TTL of the gateways' memory of valid keys, gateway/verified_keys.py).

The gateway uses these functions through its pool; `forgeline keys` (store-level) through a
connection of its own. Every function takes an async psycopg connection and commits nothing by
itself beyond its own transaction block.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from projections.schema import SCHEMA_LOCK_KEY

TABLE = sql.Identifier("forgeline_api_keys")
KEY_PREFIX = "fl_"
MIN_CONFIGURED_KEY_CHARS = 24  # FORGELINE_ADMIN_KEY: long enough to be unguessable
MAX_PROJECTS = 32
MAX_NAME_CHARS = 100
FIRST_KEY_NAME = "first admin key"
CONFIGURED_KEY_NAME = "FORGELINE_ADMIN_KEY"
# last_used_at is written at most this often per key: not one write per request.
TOUCH_EVERY = timedelta(seconds=60)

_PROJECT = re.compile(r"^[^\s,][^,]{0,255}$")


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        """Each role can do what the roles below it can."""
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


class KeySpec(BaseModel):
    """What a new key is: the body of POST /v1/keys and the flags of `forgeline keys create`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    projects: Annotated[list[str], Field(max_length=MAX_PROJECTS)] = Field(default_factory=list)
    name: Annotated[str, Field(max_length=MAX_NAME_CHARS)] = ""

    @field_validator("projects")
    @classmethod
    def _projects_are_names(cls, value: list[str]) -> list[str]:
        for project in value:
            if not _PROJECT.match(project):
                raise ValueError(
                    f"project {project!r} must be 1-256 characters, no comma, not starting "
                    "with a space"
                )
        return sorted(set(value))

    @model_validator(mode="after")
    def _admins_are_global(self) -> KeySpec:
        if self.role is Role.ADMIN and self.projects:
            raise ValueError(
                "an admin key cannot be limited to projects (it manages every key); "
                "give a scoped key the operator or viewer role"
            )
        return self


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: Role
    projects: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def scoped(self) -> bool:
        """True when the key sees only requests of its projects."""
        return bool(self.projects)

    def may_see(self, project: str | None) -> bool:
        return not self.scoped or (project is not None and project in self.projects)

    def as_json(self) -> dict[str, Any]:
        """What the API and `forgeline keys list` show: never the secret, nor its digest."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "projects": list(self.projects),
            "created_at": _iso(self.created_at),
            "last_used_at": _iso(self.last_used_at),
            "revoked_at": _iso(self.revoked_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def generate_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_id() -> str:
    return "key_" + secrets.token_hex(8)


_COLUMNS = sql.SQL("id, name, role, projects, created_at, last_used_at, revoked_at")


def _key(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        role=Role(row["role"]),
        projects=tuple(row["projects"]),
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


async def create_table(conn: AsyncConnection[Any]) -> None:
    async with conn.transaction():
        # Serialised with other processes creating tables at the same time.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {t} ("
                " id text PRIMARY KEY, key_sha256 text NOT NULL UNIQUE, name text NOT NULL,"
                " role text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),"
                " projects text[] NOT NULL DEFAULT '{{}}',"
                " created_at timestamptz NOT NULL DEFAULT now(), last_used_at timestamptz,"
                " revoked_at timestamptz)"
            ).format(t=TABLE)
        )


async def _insert(conn: AsyncConnection[Any], spec: KeySpec, secret: str) -> ApiKey:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL(
                "INSERT INTO {t} (id, key_sha256, name, role, projects)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING {c}"
            ).format(t=TABLE, c=_COLUMNS),
            (_new_id(), digest(secret), spec.name, spec.role.value, list(spec.projects)),
        )
        row = await cur.fetchone()
    assert row is not None
    return _key(row)


async def create_key(conn: AsyncConnection[Any], spec: KeySpec) -> tuple[ApiKey, str]:
    """A new key and its secret: the only time the secret exists outside its holder."""
    secret = generate_secret()
    async with conn.transaction():
        key = await _insert(conn, spec, secret)
    return key, secret


async def list_keys(conn: AsyncConnection[Any]) -> list[ApiKey]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL("SELECT {c} FROM {t} ORDER BY created_at, id").format(t=TABLE, c=_COLUMNS)
        )
        return [_key(row) for row in await cur.fetchall()]


async def get_key(conn: AsyncConnection[Any], key_id: str) -> ApiKey | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL("SELECT {c} FROM {t} WHERE id = %s").format(t=TABLE, c=_COLUMNS), (key_id,)
        )
        row = await cur.fetchone()
    return _key(row) if row else None


async def revoke_key(conn: AsyncConnection[Any], key_id: str) -> ApiKey | None:
    """Revokes the key (in the store at once; gateways holding it as valid see it within their
    key cache's TTL); None when there is no such key. Revoking a revoked key changes nothing."""
    async with conn.transaction():
        await conn.execute(
            sql.SQL(
                "UPDATE {t} SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL"
            ).format(t=TABLE),
            (key_id,),
        )
    return await get_key(conn, key_id)


async def find_key(conn: AsyncConnection[Any], secret: str) -> ApiKey | None:
    """The key this secret is (revoked ones included), or None."""
    wanted = digest(secret)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL("SELECT {c}, key_sha256 FROM {t} WHERE key_sha256 = %s").format(
                t=TABLE, c=_COLUMNS
            ),
            (wanted,),
        )
        row = await cur.fetchone()
    if row is None or not hmac.compare_digest(row["key_sha256"], wanted):
        return None
    return _key(row)


async def touch(conn: AsyncConnection[Any], key: ApiKey, now: datetime | None = None) -> None:
    """Records that the key was used, at most once per TOUCH_EVERY."""
    now = now or datetime.now(UTC)
    if key.last_used_at is not None and now - key.last_used_at < TOUCH_EVERY:
        return
    await conn.execute(
        sql.SQL("UPDATE {t} SET last_used_at = now() WHERE id = %s").format(t=TABLE), (key.id,)
    )


@dataclass(frozen=True)
class StartUp:
    """What the start-up of a gateway did about keys."""

    first_secret: str | None = None  # a first admin key made now: to be shown once
    configured: ApiKey | None = None  # the key of FORGELINE_ADMIN_KEY


async def start_up(
    conn: AsyncConnection[Any], *, configured: str | None, make_first: bool
) -> StartUp:
    """At a gateway's start: FORGELINE_ADMIN_KEY, when set, is made an admin key unless it is one
    already (a revoked one stays revoked); otherwise, when the table holds no key at all and
    make_first, a first admin key is made and its secret returned (once: the next start finds
    a key). Serialised across processes, so two gateways starting together make one key."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        if configured is not None:
            key = await find_key(conn, configured)
            if key is None:
                spec = KeySpec(role=Role.ADMIN, name=CONFIGURED_KEY_NAME)
                key = await _insert(conn, spec, configured)
            return StartUp(configured=key)
        if not make_first:
            return StartUp()
        cur = await conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {t})").format(t=TABLE))
        row = await cur.fetchone()
        if row is not None and row[0]:
            return StartUp()
        secret = generate_secret()
        await _insert(conn, KeySpec(role=Role.ADMIN, name=FIRST_KEY_NAME), secret)
        return StartUp(first_secret=secret)


async def delete_key(conn: AsyncConnection[Any], secret: str) -> None:
    """Removes a key as if it never was (the demo's own throwaway key; not for people's keys,
    which are revoked so that the events naming them stay explainable)."""
    async with conn.transaction():
        await conn.execute(
            sql.SQL("DELETE FROM {t} WHERE key_sha256 = %s").format(t=TABLE), (digest(secret),)
        )

"""API keys on the gateway, with every role running in this process (run_services).

The auth matrix (each caller x each endpoint), project scoping, revocation, the rate limit,
CORS, who-did-what in the events, and a scan proving no secret lands in the store, the read
tables, the streams or the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql
from pydantic import SecretStr

from broker import subjects
from broker.connection import connect
from forgeline.bootstrap import Servers, run_services
from forgeline.settings import Settings
from gateway import keys
from gateway.app import PUBLIC_PATHS, ROUTES
from tests.integration.conftest import eventually

ADMIN_KEY = "fl_integration_admin_" + "k" * 24

Start = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def bearer(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


@pytest.fixture
def start(own_nats: str, database_url: str, tmp_path: Path) -> Start:
    """Starts every role with these settings; yields an HTTP client without a key."""

    @contextlib.asynccontextmanager
    async def started(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        settings = Settings(
            **{
                "data_dir": tmp_path / "data",
                "nats_url": own_nats,
                "database_url": database_url,
                "provisioner": "local",
                "worker_name": "auth-test",
                "host": "127.0.0.1",
                "port": 0,
                "shutdown_grace_s": 5,
                "admin_key": SecretStr(ADMIN_KEY),
                "rate_limit_per_min": 0,
                **overrides,
            }
        )
        port: list[int] = []
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_services(
                settings,
                Servers(nats_url=own_nats, database_url=database_url),
                stop,
                on_ready=port.append,
            )
        )
        await eventually(lambda: port or task.done(), timeout=30, message="the services")
        assert not task.done(), f"the services stopped: {task.exception()!r}"
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port[0]}", timeout=15
            ) as http:
                yield http
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)

    return started


async def make_key(http: httpx.AsyncClient, role: str, **fields: Any) -> dict[str, Any]:
    """A key made by the admin over HTTP: its fields plus "key", the secret."""
    answer = await http.post("/v1/keys", json={"role": role, **fields}, headers=bearer(ADMIN_KEY))
    assert answer.status_code == 201, answer.text
    made: dict[str, Any] = answer.json()
    assert made["key"].startswith("fl_") and len(made["key"]) >= 40
    return made


async def submit(
    http: httpx.AsyncClient,
    secret: str,
    repo: Path,
    prompt: str = "echo hi > hi.txt",
    **fields: Any,
) -> dict[str, Any]:
    answer = await http.post(
        "/v1/requests",
        json={"repo": str(repo), "prompt": prompt, **fields},
        headers=bearer(secret),
    )
    assert answer.status_code == 202, answer.text
    accepted: dict[str, Any] = answer.json()
    return accepted


async def wait_status(
    http: httpx.AsyncClient, request_id: str, statuses: set[str], timeout: float = 30
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        answer = await http.get(f"/v1/requests/{request_id}", headers=bearer(ADMIN_KEY))
        if answer.status_code != 200:
            return None
        view: dict[str, Any] = answer.json()
        return view if view["status"] in statuses else None

    result: dict[str, Any] = await eventually(reached, timeout, f"{request_id} in {statuses}")
    return result


def assert_error(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, (answer.request.url.path, answer.text)
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    error: dict[str, Any] = body["error"]
    return error


# -- the matrix -----------------------------------------------------------------------------

ROLES = ("viewer", "operator", "admin")
RANK = {"viewer": 1, "operator": 2, "admin": 3}


def endpoints(ids: dict[str, str]) -> list[tuple[str, str, dict[str, Any] | None, str | None]]:
    """(method, path, JSON body, least role) of every route; None = no key needed."""
    return [
        ("GET", "/healthz", None, None),
        ("GET", "/readyz", None, None),
        ("GET", "/metrics", None, "viewer"),
        ("GET", "/v1/whoami", None, "viewer"),
        ("GET", "/v1/agents", None, "viewer"),
        ("GET", "/v1/requests", None, "viewer"),
        ("GET", f"/v1/requests/{ids['request']}", None, "viewer"),
        ("GET", f"/v1/requests/{ids['request']}/events", None, "viewer"),
        ("GET", f"/v1/runs/{ids['run']}", None, "viewer"),
        ("GET", f"/v1/runs/{ids['run']}/patch", None, "viewer"),
        ("GET", f"/v1/runs/{ids['run']}/logs?follow=0", None, "viewer"),
        ("GET", "/v1/dead-letters", None, "operator"),
        ("POST", "/v1/requests", {"repo": ids["repo"], "prompt": "true"}, "operator"),
        ("POST", f"/v1/requests/{ids['request']}/rerun", {"prompt": "true"}, "operator"),
        ("POST", f"/v1/requests/{ids['request']}/cancel", None, "operator"),
        ("GET", "/v1/keys", None, "admin"),
        ("POST", "/v1/keys", {"role": "viewer", "name": "from the matrix"}, "admin"),
        ("POST", f"/v1/keys/{ids['spare_key']}/revoke", None, "admin"),
    ]


# Allowed calls may still be refused for what they ask, never for who asks: a rerun or a
# cancel meets a run that an earlier caller of the matrix started or ended.
ALLOWED = {
    ("POST", "/rerun"): {202, 409},
    ("POST", "/cancel"): {202, 409},
    ("POST", "/v1/requests"): {202},
    ("POST", "/v1/keys"): {201},
}


def allowed_statuses(method: str, path: str) -> set[int]:
    for (m, suffix), statuses in ALLOWED.items():
        if m == method and path.endswith(suffix):
            return statuses
    return {200}


def test_every_route_is_in_the_matrix_and_guarded() -> None:
    ids = {"request": "R", "run": "U", "repo": "/r", "spare_key": "K"}
    listed = {(m, p.split("?")[0]) for m, p, _, _ in endpoints(ids)}
    for route in ROUTES:
        for method in route.methods or ():
            if method == "HEAD":
                continue
            path = route.path.replace("{id}", "R" if "/requests/" in route.path else "U")
            if route.path.startswith("/v1/keys/"):
                path = route.path.replace("{id}", "K")
            assert (method, path) in listed, (method, route.path)
            guarded = getattr(route.endpoint, "required_role", None)
            assert (guarded is None) == (route.path in PUBLIC_PATHS), route.path


async def test_auth_matrix(start: Start, git_repo: Path) -> None:
    async with start() as http:
        made = {role: await make_key(http, role, name=f"matrix {role}") for role in ROLES}
        revoked = await make_key(http, "admin", name="revoked")
        spare = await make_key(http, "viewer", name="spare")
        answer = await http.post(f"/v1/keys/{revoked['id']}/revoke", headers=bearer(ADMIN_KEY))
        assert answer.status_code == 200 and answer.json()["revoked_at"]
        accepted = await submit(http, ADMIN_KEY, git_repo)
        await wait_status(http, accepted["request_id"], {"patch_ready"})
        ids = {
            "request": accepted["request_id"],
            "run": accepted["run_id"],
            "repo": str(git_repo),
            "spare_key": spare["id"],
        }
        callers: dict[str, dict[str, str]] = {
            "no key": {},
            "unknown key": bearer("fl_" + "x" * 43),
            "not bearer": {"Authorization": f"Basic {made['admin']['key']}"},
            "revoked key": bearer(revoked["key"]),
            **{role: bearer(made[role]["key"]) for role in ROLES},
        }
        wrong: list[str] = []
        for method, path, body, least in endpoints(ids):
            for caller, headers in callers.items():
                answer = await http.request(method, path, json=body, headers=headers)
                if least is None:
                    expected = {200}
                elif caller not in RANK:
                    expected = {401}
                elif RANK[caller] < RANK[least]:
                    expected = {403}
                else:
                    expected = allowed_statuses(method, path)
                if answer.status_code not in expected:
                    wrong.append(
                        f"{caller:12} {method} {path}: {answer.status_code} not in {expected}"
                        f" {answer.text[:120]}"
                    )
                    continue
                if answer.status_code in (401, 403):
                    error = assert_error(answer, answer.status_code)
                    assert error["code"] == ("unauthorized" if expected == {401} else "forbidden")
                if answer.status_code == 401:
                    assert answer.headers["www-authenticate"].startswith("Bearer"), answer.headers
        assert not wrong, "\n".join(wrong)


# -- keys ----------------------------------------------------------------------------------


async def test_keys_are_stored_hashed_shown_once_and_revoked_at_once(
    start: Start, database_url: str
) -> None:
    async with start() as http:
        made = await make_key(http, "viewer", name="ci", projects=["alpha", "beta"])
        secret = made.pop("key")
        assert made["role"] == "viewer" and made["projects"] == ["alpha", "beta"]
        who = await http.get("/v1/whoami", headers=bearer(secret))
        assert who.status_code == 200 and who.json()["id"] == made["id"]

        listed = (await http.get("/v1/keys", headers=bearer(ADMIN_KEY))).json()["items"]
        mine = next(item for item in listed if item["id"] == made["id"])
        assert set(mine) == {
            "id", "name", "role", "projects", "created_at", "last_used_at", "revoked_at",
        }  # fmt: skip
        assert secret not in str(listed) and keys.digest(secret) not in str(listed)
        assert mine["last_used_at"] is not None  # the whoami above

        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT * FROM forgeline_api_keys").fetchall()
        assert any(keys.digest(secret) in row for row in rows)
        assert secret not in str(rows) and ADMIN_KEY not in str(rows)

        revoked = await http.post(f"/v1/keys/{made['id']}/revoke", headers=bearer(ADMIN_KEY))
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        error = assert_error(await http.get("/v1/whoami", headers=bearer(secret)), 401)
        assert "revoked" in error["message"]
        again = await http.post(f"/v1/keys/{made['id']}/revoke", headers=bearer(ADMIN_KEY))
        assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
        assert_error(await http.post("/v1/keys/key_nope/revoke", headers=bearer(ADMIN_KEY)), 404)


async def test_a_key_revoked_elsewhere_stops_working_within_the_key_cache_ttl(
    start: Start, database_url: str
) -> None:
    """Revoked by another process (`forgeline keys revoke`, another gateway): this gateway
    held the key as valid for at most FORGELINE_API_KEY_CACHE_S (gateway/verified_keys.py)."""
    async with start() as http:
        made = await make_key(http, "operator", name="revoked elsewhere")
        secret = made["key"]
        assert (await http.get("/v1/whoami", headers=bearer(secret))).status_code == 200
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            assert await keys.revoke_key(conn, made["id"]) is not None

        async def refused() -> bool:
            answer = await http.get("/v1/whoami", headers=bearer(secret))
            return answer.status_code == 401 and "revoked" in answer.json()["error"]["message"]

        # The default TTL is 2 s; the margin is for a loaded machine, not part of the promise.
        await eventually(refused, 15, "the revoked key refused")


async def test_bad_key_specs_are_422(start: Start) -> None:
    async with start() as http:
        admin = bearer(ADMIN_KEY)
        for body in (
            {"role": "root"},
            {"role": "admin", "projects": ["alpha"]},  # admin keys are global
            {"role": "viewer", "projects": ["a,b"]},
            {"role": "viewer", "secret": "mine"},
            {},
        ):
            error = assert_error(await http.post("/v1/keys", json=body, headers=admin), 422)
            assert error["code"] == "validation_failed", body


async def test_the_configured_admin_key_is_made_once_and_a_revoked_one_stays_revoked(
    start: Start, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with start() as http:
        who = (await http.get("/v1/whoami", headers=bearer(ADMIN_KEY))).json()
        assert who["role"] == "admin" and who["name"] == keys.CONFIGURED_KEY_NAME
    async with start() as http:  # a restart: the same key, not a second one
        listed = (await http.get("/v1/keys", headers=bearer(ADMIN_KEY))).json()["items"]
        assert [item["id"] for item in listed] == [who["id"]]
        other = await make_key(http, "admin", name="other admin")
        await http.post(f"/v1/keys/{who['id']}/revoke", headers=bearer(other["key"]))
    with caplog.at_level(logging.WARNING, logger="forgeline"):
        async with start() as http:
            assert_error(await http.get("/v1/whoami", headers=bearer(ADMIN_KEY)), 401)
    assert "revoked" in caplog.text and ADMIN_KEY not in caplog.text


async def test_first_admin_key_is_made_only_when_someone_shows_it_and_the_table_is_empty(
    own_nats: str, database_url: str, tmp_path: Path
) -> None:
    shown: list[str] = []

    async def start_once(on_first_key: Callable[[str], None] | None) -> None:
        settings = Settings(
            data_dir=tmp_path / "data",
            nats_url=own_nats,
            database_url=database_url,
            provisioner="local",
            port=0,
            shutdown_grace_s=5,
        )
        stop = asyncio.Event()
        await run_services(
            settings,
            Servers(nats_url=own_nats, database_url=database_url),
            stop,
            roles=frozenset({"gateway"}),
            on_ready=lambda _port: stop.set(),
            on_first_key=on_first_key,
        )

    await start_once(None)  # nobody to show it to: no key made
    await start_once(shown.append)
    await start_once(shown.append)
    assert len(shown) == 1 and shown[0].startswith("fl_")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        found = await keys.find_key(conn, shown[0])
        assert found is not None and found.role is keys.Role.ADMIN
        assert [k.id for k in await keys.list_keys(conn)] == [found.id]


# -- projects ------------------------------------------------------------------------------


async def test_a_key_with_projects_sees_and_acts_only_on_its_projects(
    start: Start, git_repo: Path
) -> None:
    async with start() as http:
        alpha_op = (await make_key(http, "operator", projects=["alpha"]))["key"]
        beta_viewer = (await make_key(http, "viewer", projects=["beta", "gamma"]))["key"]
        everyone = (await make_key(http, "viewer"))["key"]

        mine = [
            await submit(http, alpha_op, git_repo, labels={"project": "alpha"}) for _ in range(3)
        ]
        beta = await submit(http, ADMIN_KEY, git_repo, labels={"project": "beta"})
        none = await submit(http, ADMIN_KEY, git_repo)
        for accepted in (*mine, beta, none):
            await wait_status(http, accepted["request_id"], {"patch_ready"})

        # Submitting outside its projects: 403, recorded nowhere.
        for labels in ({"project": "beta"}, {}, {"team": "alpha"}):
            answer = await http.post(
                "/v1/requests",
                json={"repo": str(git_repo), "prompt": "true", "labels": labels},
                headers=bearer(alpha_op),
            )
            assert assert_error(answer, 403)["code"] == "forbidden_project", labels

        # Another project's request (or one of none) is 404 on every route, as if absent.
        for other in (beta, none):
            rid, run = other["request_id"], other["run_id"]
            for method, path in (
                ("GET", f"/v1/requests/{rid}"),
                ("GET", f"/v1/requests/{rid}/events"),
                ("GET", f"/v1/runs/{run}"),
                ("GET", f"/v1/runs/{run}/patch"),
                ("GET", f"/v1/runs/{run}/logs?follow=0"),
                ("POST", f"/v1/requests/{rid}/rerun"),
                ("POST", f"/v1/requests/{rid}/cancel"),
            ):
                answer = await http.request(method, path, headers=bearer(alpha_op))
                assert assert_error(answer, 404)["code"] == "not_found", (method, path)

        # Its own: everything works.
        own = mine[0]
        for path in (
            f"/v1/requests/{own['request_id']}",
            f"/v1/requests/{own['request_id']}/events",
            f"/v1/runs/{own['run_id']}",
            f"/v1/runs/{own['run_id']}/patch",
            f"/v1/runs/{own['run_id']}/logs?follow=0",
        ):
            assert (await http.get(path, headers=bearer(alpha_op))).status_code == 200, path
        rerun = await http.post(
            f"/v1/requests/{own['request_id']}/rerun", json={}, headers=bearer(alpha_op)
        )
        assert rerun.status_code == 202, rerun.text

        # Lists hold only the key's projects, paged like the full list.
        async def listed(secret: str, limit: int) -> list[str]:
            ids: list[str] = []
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
                page = await http.get("/v1/requests", params=params, headers=bearer(secret))
                assert page.status_code == 200, page.text
                ids += [item["id"] for item in page.json()["items"]]
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    return ids

        full = await listed(everyone, 50)
        assert len(full) == 5
        alpha_ids = [rid for rid in full if rid in {m["request_id"] for m in mine}]
        assert await listed(alpha_op, 1) == alpha_ids  # newest first, one per page
        assert await listed(alpha_op, 2) == alpha_ids
        assert await listed(beta_viewer, 50) == [beta["request_id"]]
        status = await http.get(
            "/v1/requests", params={"status": "failed"}, headers=bearer(alpha_op)
        )
        assert status.json()["items"] == []

        # Fleet-wide metrics are for keys without projects.
        assert_error(await http.get("/metrics", headers=bearer(beta_viewer)), 403)
        assert (await http.get("/metrics", headers=bearer(everyone))).status_code == 200


# -- who did what ---------------------------------------------------------------------------


async def test_the_events_name_the_key_that_submitted_reran_and_cancelled(
    start: Start, git_repo: Path
) -> None:
    async with start() as http:
        alice = await make_key(http, "operator", name="alice")
        bob = await make_key(http, "operator", name="bob")
        accepted = await submit(http, alice["key"], git_repo, prompt="sleep 30")
        rid = accepted["request_id"]
        await wait_status(http, rid, {"running"})
        cancel = await http.post(f"/v1/requests/{rid}/cancel", headers=bearer(bob["key"]))
        assert cancel.status_code == 202, cancel.text
        await wait_status(http, rid, {"cancelled"})
        rerun = await http.post(
            f"/v1/requests/{rid}/rerun", json={"prompt": "true"}, headers=bearer(bob["key"])
        )
        assert rerun.status_code == 202, rerun.text
        await wait_status(http, rid, {"patch_ready"})

        history = (await http.get(f"/v1/requests/{rid}/events", headers=bearer(ADMIN_KEY))).json()
        by_type = {event["type"]: event["data"] for event in history["events"]}
        assert by_type["RequestSubmitted"]["submitted_by"] == alice["id"]
        assert by_type["CancelRequested"]["requested_by"] == bob["id"]
        assert by_type["RerunRequested"]["requested_by"] == bob["id"]


# -- rate limit and CORS --------------------------------------------------------------------


async def test_a_key_over_its_rate_limit_gets_429_with_retry_after(start: Start) -> None:
    async with start(rate_limit_per_min=60, rate_limit_burst=3) as http:
        busy = (await make_key(http, "viewer"))["key"]  # the admin spent one token on it
        for _ in range(3):
            assert (await http.get("/v1/whoami", headers=bearer(busy))).status_code == 200
        refused = await http.get("/v1/whoami", headers=bearer(busy))
        error = assert_error(refused, 429)
        assert error["code"] == "rate_limited"
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 2
        # Per key: another key still has its tokens; probes need none.
        assert (await http.get("/v1/whoami", headers=bearer(ADMIN_KEY))).status_code == 200
        assert (await http.get("/healthz")).status_code == 200
        await asyncio.sleep(retry_after)
        assert (await http.get("/v1/whoami", headers=bearer(busy))).status_code == 200


async def test_cors_allows_the_configured_origins_only(start: Start) -> None:
    origin = "https://ui.example.com"
    async with start(cors_origins=[origin]) as http:
        preflight = await http.options(
            "/v1/requests",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        answer = await http.get("/v1/whoami", headers={"Origin": origin, **bearer(ADMIN_KEY)})
        assert answer.headers["access-control-allow-origin"] == origin
        unauthorised = await http.get("/v1/whoami", headers={"Origin": origin})
        assert unauthorised.status_code == 401
        assert unauthorised.headers["access-control-allow-origin"] == origin
        other = await http.get(
            "/v1/whoami", headers={"Origin": "https://evil.example", **bearer(ADMIN_KEY)}
        )
        assert "access-control-allow-origin" not in other.headers
    async with start() as http:  # none configured: no CORS headers at all
        answer = await http.get("/v1/whoami", headers={"Origin": origin, **bearer(ADMIN_KEY)})
        assert answer.status_code == 200
        assert "access-control-allow-origin" not in answer.headers


# -- no secret anywhere ---------------------------------------------------------------------


async def test_no_key_lands_in_the_store_the_read_tables_the_streams_or_the_logs(
    start: Start,
    git_repo: Path,
    database_url: str,
    own_nats: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="httpcore")
    async with start() as http:
        made = [await make_key(http, role, name=f"scan {role}") for role in ROLES]
        secrets = [ADMIN_KEY, *(m["key"] for m in made)]
        operator = made[1]["key"]
        accepted = await submit(
            http, operator, git_repo, prompt="echo scanned > s.txt", labels={"project": "x"}
        )
        rid = accepted["request_id"]
        await wait_status(http, rid, {"patch_ready"})
        rerun = await http.post(f"/v1/requests/{rid}/rerun", json={}, headers=bearer(operator))
        assert rerun.status_code == 202
        await wait_status(http, rid, {"patch_ready"})
        long = await submit(http, ADMIN_KEY, git_repo, prompt="sleep 30")
        await wait_status(http, long["request_id"], {"running"})
        await http.post(f"/v1/requests/{long['request_id']}/cancel", headers=bearer(operator))
        await wait_status(http, long["request_id"], {"cancelled"})
        # Refused calls too: a bad key, a wrong role, an over-long header.
        await http.get("/v1/requests", headers=bearer(made[0]["key"] + "x"))
        await http.post("/v1/requests", json={}, headers=bearer(made[0]["key"]))
        await http.get("/v1/requests", headers=bearer("fl_" + "y" * 600))

    # Every table of the database, every row as text; the keys table holds digests only.
    with psycopg.connect(database_url) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        ]
        assert {"forgeline_events", "forgeline_view_requests", "forgeline_api_keys"} <= set(tables)
        dump = {
            table: "\n".join(
                _text(value)
                for row in conn.execute(
                    sql.SQL("SELECT * FROM {}").format(sql.Identifier(table))
                ).fetchall()
                for value in row
            )
            for table in tables
        }
    assert "scanned" in dump["forgeline_events"]  # the scan reads the states
    for table, text in dump.items():
        for secret in secrets:
            assert secret not in text, f"a key in {table}"
            if table != "forgeline_api_keys":
                assert keys.digest(secret) not in text, f"a key's digest in {table}"

    # The streams: every event published, every run output line.
    nc = await connect(own_nats, name="auth-scan")
    try:
        js = nc.jetstream()
        published = []
        for stream in (subjects.EVENTS_STREAM, subjects.LOGS_STREAM):
            state = (await js.stream_info(stream)).state
            for seq in range(state.first_seq, state.last_seq + 1):
                with contextlib.suppress(Exception):
                    published.append((await js.get_msg(stream, seq)).data or b"")
    finally:
        await nc.close()
    assert any(b"scanned" in data for data in published)
    blob = b"\n".join(published)
    assert not any(secret.encode() in blob for secret in secrets)

    assert "created by key" in caplog.text  # the gateway's logs were captured
    for secret in secrets:
        assert secret not in caplog.text


def _text(value: Any) -> str:
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)

"""Encryption at rest of event payloads (FORGELINE_CIPHER_KEY), on real Postgres and NATS.

With a key, every state in forgeline_events is AES-GCM ciphertext: the prompt is nowhere in the
raw bytes, and a reader without the key (or with another) cannot decode an event. With the key,
everything works as before: the services run requests, the relay publishes readable envelopes,
the projections and the events endpoint show the data, the audit queries decode the history.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from eventsourcing.persistence import MapperDeserialisationError
from pydantic import SecretStr, ValidationError

from broker import subjects
from broker.connection import connect
from domain.application import EVENTS_TABLE, Forgeline
from forgeline.bootstrap import Servers, open_store, run_services
from forgeline.settings import CIPHER_KEY_ENV, Settings, eventsourcing_env
from projections.audit import load_request_events
from tests.event_scenario import record_every_event_type
from tests.integration.conftest import eventually, in_thread

SECRET = "echo top-secret-6f2d > secret.txt"
ADMIN_KEY = "fl_encryption_test_admin_key_0123456789"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def raw_states(database_url: str) -> list[bytes]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(f"SELECT state FROM {EVENTS_TABLE} ORDER BY notification_id")
        return [bytes(state) for (state,) in rows.fetchall()]


@contextlib.contextmanager
def store_with(database_url: str, key: str | None) -> Any:
    app = Forgeline(env=eventsourcing_env(database_url, SecretStr(key) if key else None))
    try:
        yield app
    finally:
        app.close()


def test_with_a_key_the_stored_states_are_ciphertext_and_the_app_reads_them(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key()
    monkeypatch.setenv(CIPHER_KEY_ENV, key)  # how every process (and open_store) gets it
    app = open_store(database_url)
    try:
        scenario = record_every_event_type(app, prompt=SECRET)
        assert app.get_request(scenario.request.id).prompt == SECRET
    finally:
        app.close()

    states = raw_states(database_url)
    assert len(states) == scenario.request.version + sum(run.version for run in scenario.runs)
    for state in states:
        assert b"top-secret" not in state
        assert b"repo" not in state and b"_type_" not in state
        with pytest.raises(ValueError):  # ciphertext: not JSON (nor UTF-8, almost surely)
            json.loads(state)

    monkeypatch.delenv(CIPHER_KEY_ENV)
    with store_with(database_url, key) as keyed:
        request = keyed.get_request(scenario.request.id)
        assert request.prompt == SECRET and request.submitted_by == "alice"
        assert [keyed.get_run(r.id).status for r in scenario.runs] == [
            run.status for run in scenario.runs
        ]
    with store_with(database_url, None) as plain, pytest.raises(MapperDeserialisationError):
        plain.get_request(scenario.request.id)
    with store_with(database_url, new_key()) as other, pytest.raises(MapperDeserialisationError):
        other.get_request(scenario.request.id)


def test_without_a_key_the_states_are_plain_json(database_url: str) -> None:
    with store_with(database_url, None) as app:
        record_every_event_type(app, prompt=SECRET)
    assert any(b"top-secret" in state for state in raw_states(database_url))


def test_a_bad_key_is_refused_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = "not-a-key-but-a-password"
    monkeypatch.setenv(CIPHER_KEY_ENV, bad)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert bad not in str(refused.value)
    assert "openssl rand -base64 32" in str(refused.value)
    with pytest.raises(ValueError) as refused_env:
        eventsourcing_env("postgresql://u@localhost/db")
    assert bad not in str(refused_env.value)

    key = new_key()
    monkeypatch.setenv(CIPHER_KEY_ENV, key)
    settings = Settings()
    assert settings.cipher_key is not None
    assert key not in repr(settings) and key not in str(settings.model_dump())
    monkeypatch.setenv(CIPHER_KEY_ENV, "")
    assert Settings().cipher_key is None
    assert "CIPHER_KEY" not in eventsourcing_env("postgresql://u@localhost/db")


@pytest.fixture
async def encrypted_services(
    own_nats: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, Forgeline]]:
    """Every role, with a cipher key; the gateway's base URL and a store app with the key."""
    monkeypatch.setenv(CIPHER_KEY_ENV, new_key())
    settings = Settings(
        data_dir=tmp_path / "data",
        nats_url=own_nats,
        database_url=database_url,
        provisioner="local",
        worker_name="encryption-test",
        host="127.0.0.1",
        port=0,
        shutdown_grace_s=5,
        admin_key=SecretStr(ADMIN_KEY),
    )
    assert settings.cipher_key is not None
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
    await eventually(lambda: port or task.done(), timeout=30, message="the services to start")
    assert not task.done(), f"the services stopped: {task.exception()!r}"
    app = await in_thread(open_store, database_url)
    try:
        yield f"http://127.0.0.1:{port[0]}", app
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        app.close()


async def test_with_a_key_the_whole_system_works(
    encrypted_services: tuple[str, Forgeline], own_nats: str, database_url: str, git_repo: Path
) -> None:
    base, app = encrypted_services
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=auth) as http:
        answer = await http.post("/v1/requests", json={"repo": str(git_repo), "prompt": SECRET})
        assert answer.status_code == 202, answer.text
        request_id, run_id = answer.json()["request_id"], answer.json()["run_id"]

        async def succeeded() -> bool:
            run = await http.get(f"/v1/runs/{run_id}")
            assert run.status_code in (200, 404)
            status = run.json().get("status") if run.status_code == 200 else None
            assert status in (None, "queued", "provisioning", "running", "succeeded")
            return status == "succeeded"

        await eventually(succeeded, timeout=30, message="the run to succeed")
        patch = await http.get(f"/v1/runs/{run_id}/patch")
        assert patch.status_code == 200 and "top-secret-6f2d" in patch.text
        events = (await http.get(f"/v1/requests/{request_id}/events")).json()["events"]
        assert events[0]["type"] == "RequestSubmitted"
        assert events[0]["data"]["prompt"] == SECRET
        assert events[-1]["type"] == "RunSucceeded"

    states = await in_thread(raw_states, database_url)
    assert len(states) == len(events)
    assert not any(b"top-secret" in state for state in states)

    def audit() -> list[Any] | None:
        with psycopg.connect(database_url) as conn:
            return load_request_events(app, conn, uuid.UUID(request_id))

    history = await in_thread(audit)
    assert history is not None
    assert [position for position, _ in history] == [e["position"] for e in events]
    assert history[0][1].prompt == SECRET

    # The relay decrypts: subscribers get readable envelopes (NATS is transport, not the
    # record; docs/events.md says how to encrypt JetStream's own files).
    nc = await connect(own_nats, name="encryption-test-reader")
    try:
        js = nc.jetstream()

        async def published() -> list[dict[str, Any]]:
            last = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq or 0
            messages = [await js.get_msg(subjects.EVENTS_STREAM, seq=n) for n in range(1, last + 1)]
            return [json.loads(m.data or b"{}") for m in messages]

        envelopes = await eventually(
            lambda: _all(published, len(states)), message="every event on the stream"
        )
    finally:
        await nc.close()
    assert envelopes[0]["type"] == "forgeline.Request.RequestSubmitted.v2"
    assert envelopes[0]["data"]["prompt"] == SECRET


async def _all(fetch: Any, count: int) -> Any:
    found = await fetch()
    return found if len(found) >= count else None

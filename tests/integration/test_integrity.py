"""Tamper evidence on real Postgres: the hash triggers, the append-only guard, `forgeline verify`.

Tampering is done the only way it can be: as a superuser who switches the guard trigger off,
changes rows, and switches it on again. verify must name the first position that no longer
adds up, and say what differs.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError
from psycopg import sql

from domain.application import EVENTS_TABLE, Forgeline
from forgeline.bootstrap import open_store
from forgeline.embedded import EmbeddedPostgres
from forgeline.settings import eventsourcing_env
from forgeline.store_integrity import (
    GUARD_TRIGGER,
    HASH_TRIGGER,
    ZERO_HASH,
    chain_digest,
    ensure_store_integrity,
    event_digest,
    install,
    verify,
)
from tests.integration.conftest import store_positions
from tests.integration.test_audit import forgeline
from tests.integration.test_projections import Scenario


@pytest.fixture
def app(database_url: str) -> Iterator[Forgeline]:
    """The store with its integrity triggers (installed before the app prepares statements)."""
    store = open_store(database_url)
    ensure_store_integrity(database_url)
    yield store
    store.close()


def rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state,"
                " state_hash, event_hash, chain_hash, prev_position FROM {} ORDER BY 1"
            ).format(sql.Identifier(EVENTS_TABLE))
        ).fetchall()


def as_superuser(url: str, *statements: str, params: tuple[Any, ...] = ()) -> None:
    """Runs statements in one transaction with the append-only guard switched off."""
    with psycopg.connect(url) as conn:
        conn.execute(f"ALTER TABLE {EVENTS_TABLE} DISABLE TRIGGER {GUARD_TRIGGER}")
        for statement in statements:
            conn.execute(statement.encode(), params if "%s" in statement else None)
        conn.execute(f"ALTER TABLE {EVENTS_TABLE} ENABLE TRIGGER {GUARD_TRIGGER}")


def test_the_first_install_hashes_the_events_already_there(database_url: str) -> None:
    # A store written before the triggers existed (eventsourcing alone).
    old = Forgeline(env=eventsourcing_env(database_url))
    Scenario(old).play(5)
    old.close()
    written = len(store_positions(database_url))

    with psycopg.connect(database_url, autocommit=True) as conn:
        first = install(conn)
        again = install(conn)
    assert first.backfilled == written
    assert "trigger forgeline_events_hash" in first.created
    assert again.created == [] and again.backfilled == 0 and again.reenabled == []

    app = open_store(database_url)  # a new app: the table has new columns now
    try:
        Scenario(app).play(5)
    finally:
        app.close()
    with psycopg.connect(database_url) as conn:
        result = verify(conn)
    assert result.ok, result.first_break
    assert result.events == len(store_positions(database_url)) > written


def test_the_hashes_follow_the_documented_formula(app: Forgeline, database_url: str) -> None:
    """Computed here from the formula in docs/audit.md, not with store_integrity's helpers."""
    Scenario(app).play(3)
    previous_event: dict[UUID, bytes] = {}
    previous_chain, previous_position = bytes(32), 0
    for position, oid, version, topic, state, s_hash, e_hash, c_hash, prev in rows(database_url):
        assert s_hash == hashlib.sha256(state).digest()
        topic_bytes = topic.encode()
        expected_event = hashlib.sha256(
            previous_event.get(oid, bytes(32))
            + oid.bytes
            + version.to_bytes(8, "big")
            + len(topic_bytes).to_bytes(4, "big")
            + topic_bytes
            + s_hash
        ).digest()
        assert e_hash == expected_event
        assert (
            c_hash == hashlib.sha256(previous_chain + position.to_bytes(8, "big") + e_hash).digest()
        )
        assert prev == previous_position
        previous_event[oid] = e_hash
        previous_chain, previous_position = c_hash, position
    assert (
        event_digest(ZERO_HASH, uuid.UUID(int=1), 1, "t", b"x")
        == hashlib.sha256(
            ZERO_HASH + uuid.UUID(int=1).bytes + (1).to_bytes(8, "big") + b"\0\0\0\1t" + b"x"
        ).digest()
    )
    assert (
        chain_digest(ZERO_HASH, 7, b"e")
        == hashlib.sha256(ZERO_HASH + (7).to_bytes(8, "big") + b"e").digest()
    )


def test_concurrent_writers_keep_both_chains_intact(app: Forgeline, database_url: str) -> None:
    """Four writer processes' worth of apps saving at once: the chains follow commit order."""
    apps = [open_store(database_url) for _ in range(4)]
    errors: list[BaseException] = []

    def write(writer: Forgeline) -> None:
        try:
            Scenario(writer).play(15)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(a,)) for a in apps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for writer in apps:
        writer.close()
    assert errors == []
    with psycopg.connect(database_url) as conn:
        result = verify(conn)
    assert result.ok, result.first_break
    assert result.events == len(store_positions(database_url))


def test_a_writer_that_lost_the_race_records_nothing(app: Forgeline, database_url: str) -> None:
    """eventsourcing's IntegrityError still tells the loser, and the chains stay whole."""
    _, run = Scenario(app).submit()
    other = open_store(database_url)
    try:
        mine, theirs = app.get_run(run.id), other.get_run(run.id)
        mine.start_provisioning("worker-1")
        theirs.start_provisioning("worker-2")
        app.save(mine)
        with pytest.raises(IntegrityError):
            other.save(theirs)
    finally:
        other.close()
    with psycopg.connect(database_url) as conn:
        assert verify(conn).ok


@pytest.mark.parametrize(
    "statement",
    [
        f"UPDATE {EVENTS_TABLE} SET topic = topic",
        f"UPDATE {EVENTS_TABLE} SET state = state WHERE false",  # even matching no row
        f"DELETE FROM {EVENTS_TABLE} WHERE notification_id = 3",
        f"DELETE FROM {EVENTS_TABLE}",
        f"TRUNCATE {EVENTS_TABLE}",
    ],
)
def test_the_application_cannot_update_delete_or_truncate(
    app: Forgeline, database_url: str, statement: str
) -> None:
    Scenario(app).play(2)
    before = rows(database_url)
    with (
        psycopg.connect(database_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
    ):
        conn.execute(statement.encode())
    assert rows(database_url) == before
    with psycopg.connect(database_url) as conn:
        granted = conn.execute(
            "SELECT has_table_privilege('public', %s, 'UPDATE'),"
            " has_table_privilege('public', %s, 'DELETE'),"
            " has_table_privilege('public', %s, 'TRUNCATE')",
            (EVENTS_TABLE,) * 3,
        ).fetchone()
    assert granted == (False, False, False)


def test_a_non_superuser_application_role_is_refused_too(pg_server: EmbeddedPostgres) -> None:
    """A deployment where the application's role owns the store but is no superuser."""
    role, database = f"fl_app_{uuid.uuid4().hex[:8]}", f"t_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(role)
            )
        )
    url = pg_server.url(database).replace("postgres@", f"{role}@")
    try:
        store = open_store(url)
        try:
            ensure_store_integrity(url)
            store.close()
            store = open_store(url)
            Scenario(store).play(2)
        finally:
            store.close()
        with psycopg.connect(url) as conn:
            superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            assert superuser.fetchone() == (False,)
            for statement in (
                f"UPDATE {EVENTS_TABLE} SET state = state",
                f"DELETE FROM {EVENTS_TABLE}",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement.encode())
                conn.rollback()
            assert verify(conn).ok
    finally:
        with psycopg.connect(pg_server.url("postgres"), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_an_application_role_that_does_not_own_the_table_cannot_switch_the_guard_off(
    pg_server: EmbeddedPostgres, database_url: str
) -> None:
    """The deployment docs/audit.md recommends: an administrator owns the store, the
    application's role may only read and append (UPDATE only for eventsourcing's table lock)."""
    owner = open_store(database_url)
    ensure_store_integrity(database_url)
    owner.close()
    role = f"fl_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for grant in (
                "GRANT SELECT, INSERT, UPDATE ON {} TO {}",
                "GRANT USAGE ON SEQUENCE forgeline_events_notification_id_seq TO {1}",
            ):
                conn.execute(
                    sql.SQL(grant).format(sql.Identifier(EVENTS_TABLE), sql.Identifier(role))
                )
        url = database_url.replace("postgres@", f"{role}@")
        # Not the owner: eventsourcing must not try to create the table (nor its index).
        app = Forgeline(env={**eventsourcing_env(url), "CREATE_TABLE": "false"})
        try:
            assert ensure_store_integrity(url).failed is None  # nothing to change
            Scenario(app).play(2)
        finally:
            app.close()
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in (
                f"UPDATE {EVENTS_TABLE} SET state = state",
                f"DELETE FROM {EVENTS_TABLE}",
                f"ALTER TABLE {EVENTS_TABLE} DISABLE TRIGGER {GUARD_TRIGGER}",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement.encode())
            assert verify(conn).ok
        # A trigger the owner left disabled: this role cannot repair it, and says so.
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE {EVENTS_TABLE} DISABLE TRIGGER {GUARD_TRIGGER}")
        assert ensure_store_integrity(url).failed is not None
        assert forgeline(url, "verify")[0] == 1
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:  # its grants
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg_server.url("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# ----------------------------------------------------------------------------- tampering

Tamper = Callable[[str, list[tuple[Any, ...]]], int]  # does it; returns the expected position


def change_a_byte(url: str, stored: list[tuple[Any, ...]]) -> int:
    position = stored[20][0]
    as_superuser(
        url,
        f"UPDATE {EVENTS_TABLE} SET state = set_byte(state, 5, get_byte(state, 5) # 1)"
        " WHERE notification_id = %s",
        params=(position,),
    )
    return int(position)


def change_the_topic(url: str, stored: list[tuple[Any, ...]]) -> int:
    position = stored[11][0]
    as_superuser(
        url,
        f"UPDATE {EVENTS_TABLE} SET topic = topic || 'X' WHERE notification_id = %s",
        params=(position,),
    )
    return int(position)


def delete_an_event(url: str, stored: list[tuple[Any, ...]]) -> int:
    position = stored[15][0]
    as_superuser(url, f"DELETE FROM {EVENTS_TABLE} WHERE notification_id = %s", params=(position,))
    return int(stored[16][0])  # the next one no longer adds up


def insert_a_forged_event(url: str, stored: list[tuple[Any, ...]]) -> int:
    with psycopg.connect(url) as conn:
        conn.execute(f"ALTER TABLE {EVENTS_TABLE} DISABLE TRIGGER {HASH_TRIGGER}")
        row = conn.execute(
            f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic, state)"
            " SELECT originator_id, 999, topic, state FROM forgeline_events"
            " WHERE notification_id = %s RETURNING notification_id",
            (stored[0][0],),
        ).fetchone()
        conn.execute(f"ALTER TABLE {EVENTS_TABLE} ENABLE TRIGGER {HASH_TRIGGER}")
    assert row is not None
    return int(row[0])


def rewrite_one_event_consistently(url: str, stored: list[tuple[Any, ...]]) -> int:
    """A careful forger: changes a payload and recomputes that row's three hashes."""
    position, oid, version, topic, state, _, _, _, _ = stored[20]
    previous = [r for r in stored if r[1] == oid and r[2] < version]
    prev_event = bytes(previous[-1][6]) if previous else ZERO_HASH
    forged = bytes(state) + b" "  # still the same JSON to a reader
    s_hash = hashlib.sha256(forged).digest()
    e_hash = event_digest(prev_event, oid, version, topic, s_hash)
    c_hash = chain_digest(bytes(stored[19][7]), position, e_hash)
    as_superuser(
        url,
        f"UPDATE {EVENTS_TABLE} SET state = %s, state_hash = %s, event_hash = %s,"
        " chain_hash = %s WHERE notification_id = %s",
        params=(forged, s_hash, e_hash, c_hash, position),
    )
    return int(stored[21][0])  # the next row's links no longer match


@pytest.mark.parametrize(
    ("tamper", "kinds"),
    [
        (change_a_byte, {"state"}),
        (change_the_topic, {"event"}),
        (delete_an_event, {"missing_events", "version_gap"}),
        (insert_a_forged_event, {"unhashed"}),
        (rewrite_one_event_consistently, {"chain", "event"}),
    ],
)
def test_verify_finds_the_first_break(
    app: Forgeline, database_url: str, tamper: Tamper, kinds: set[str]
) -> None:
    Scenario(app).play(3)
    code, out = forgeline(database_url, "verify")
    assert code == 0 and out.startswith("ok: ")
    stored = rows(database_url)

    position = tamper(database_url, stored)

    code, out = forgeline(database_url, "verify")
    assert code == 1
    assert out.startswith(f"BROKEN at position {position} ("), out
    code, out = forgeline(database_url, "verify", "--json")
    assert code == 1
    found = json.loads(out)["break"]
    assert found["position"] == position and found["kind"] in kinds, found
    expected = next((r for r in stored if r[0] == position), None)
    if expected is not None:
        assert found["aggregate_id"] == str(expected[1])
        assert found["version"] == expected[2]
        assert found["aggregate"] in {"Request", "Run"}


def test_an_anchor_catches_events_removed_from_the_end(app: Forgeline, database_url: str) -> None:
    Scenario(app).play(2)
    with psycopg.connect(database_url) as conn:
        head = verify(conn)
    anchor = f"{head.head_position}:{head.head_chain}"
    assert forgeline(database_url, "verify", "--anchor", anchor)[0] == 0

    last = store_positions(database_url)[-3:]
    as_superuser(
        database_url, f"DELETE FROM {EVENTS_TABLE} WHERE notification_id = ANY(%s)", params=(last,)
    )
    assert forgeline(database_url, "verify")[0] == 0  # a shorter chain is still a chain
    code, out = forgeline(database_url, "verify", "--anchor", anchor, "--json")
    assert code == 1
    assert json.loads(out)["break"]["kind"] == "anchor"
    assert forgeline(database_url, "verify", "--anchor", "12:nothex")[0] == 2


def test_verify_reports_a_trigger_left_disabled_and_start_up_enables_it(
    app: Forgeline, database_url: str
) -> None:
    Scenario(app).play(1)
    with psycopg.connect(database_url) as conn:
        conn.execute(f"ALTER TABLE {EVENTS_TABLE} DISABLE TRIGGER {GUARD_TRIGGER}")
    code, out = forgeline(database_url, "verify")
    assert code == 1
    assert f"WARNING: trigger {GUARD_TRIGGER} is disabled" in out
    code, out = forgeline(database_url, "verify", "--json")
    assert json.loads(out)["triggers"][GUARD_TRIGGER] == "disabled"

    assert ensure_store_integrity(database_url).reenabled == [GUARD_TRIGGER]
    assert forgeline(database_url, "verify")[0] == 0


def test_installs_racing_at_start_up_install_once(database_url: str) -> None:
    Forgeline(env=eventsourcing_env(database_url)).close()
    errors: list[BaseException] = []

    def go() -> None:
        try:
            ensure_store_integrity(database_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(database_url) as conn:
        names = conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
            (EVENTS_TABLE,),
        ).fetchall()
    assert sorted(n for (n,) in names) == sorted(
        ["forgeline_events_append_only", "forgeline_events_hash", "forgeline_events_serialise"]
    )

"""Where a secret must never appear, searched for it: the event store (raw rows, and each
state decrypted and decompressed as the application reads it), every table of the database
(projections, keys, ...), and the NATS streams (logs, events, commands).

    leaks = scan_database(database_url, SECRET) + await scan_streams(js, SECRET)
    assert not leaks, leaks

Each finding names the place (table and row, or stream and sequence), never the secret.
"""

from __future__ import annotations

from typing import Any

import psycopg
from nats.js import JetStreamContext
from psycopg import sql
from pydantic import SecretStr

from broker import subjects
from domain.application import EVENTS_TABLE, Forgeline
from forgeline.bootstrap import open_store

ALL_STREAMS = (subjects.LOGS_STREAM, subjects.EVENTS_STREAM, subjects.COMMANDS_STREAM)


def _variants(secret: str) -> list[bytes]:
    # As stored text, and as JSON would escape it (a secret holding quotes or backslashes).
    raw = secret.encode()
    escaped = secret.replace("\\", "\\\\").replace('"', '\\"').encode()
    return list({raw, escaped})


def _holds(data: bytes, secret: str) -> bool:
    return any(variant in data for variant in _variants(secret))


def scan_event_store(app: Forgeline, secret: str) -> list[str]:
    """Every stored event's state, raw and as the application decodes it."""
    found = []
    start = 0
    while True:
        notifications = app.recorder.select_notifications(
            start=start, limit=1000, inclusive_of_start=False
        )
        if not notifications:
            return found
        for n in notifications:
            where = f"{EVENTS_TABLE} position {n.id} ({n.topic})"
            state = n.state
            if _holds(state, secret):
                found.append(f"{where}: raw state")
            mapper: Any = app.mapper
            if mapper.cipher is not None:
                state = mapper.cipher.decrypt(state)
            if mapper.compressor is not None:
                state = mapper.compressor.decompress(state)
            if _holds(state, secret):
                found.append(f"{where}: decoded state")
        start = notifications[-1].id


def scan_tables(database_url: str, secret: str) -> list[str]:
    """Every row of every table in the database, as text (the events table too, raw)."""
    found = []
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE'"
            " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        for schema, table in tables:
            query = sql.SQL("SELECT t::text FROM {}.{} t").format(
                sql.Identifier(schema), sql.Identifier(table)
            )
            # A bytea column prints as hex: the secret would show as its hex there.
            hexed = secret.encode().hex()
            for n, (text,) in enumerate(conn.execute(query)):
                if _holds(text.encode(), secret) or hexed in text:
                    found.append(f"table {schema}.{table} row {n}")
    return found


def scan_database(database_url: str, secret: str, cipher_key: SecretStr | None = None) -> list[str]:
    """The event store decoded (with cipher_key, default FORGELINE_CIPHER_KEY when set) and
    every table."""
    app = open_store(database_url, cipher_key)
    try:
        return scan_event_store(app, secret) + scan_tables(database_url, secret)
    finally:
        app.close()


async def scan_streams(
    js: JetStreamContext, secret: str, streams: tuple[str, ...] = ALL_STREAMS
) -> list[str]:
    """Every message still in the streams: subject, headers and payload."""
    found = []
    for stream in streams:
        try:
            info = await js.stream_info(stream)
        except Exception:
            continue  # not declared here
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except Exception:
                continue  # deleted (work queue, limits)
            headers = "".join(f"{k}:{v}" for k, v in (msg.headers or {}).items())
            if _holds((msg.subject or "").encode() + headers.encode() + (msg.data or b""), secret):
                found.append(f"stream {stream} seq {seq}")
    return found

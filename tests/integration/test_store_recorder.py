"""Forgeline's recorder (forgeline/store_recorder.py) sends a save's rows in binary: what it
stores reads back byte for byte, ids and conflicts as eventsourcing's own recorder gives them."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent

from domain.application import Forgeline
from forgeline.store_integrity import ensure_store_integrity, verify
from forgeline.store_recorder import BinaryInsertRecorder

# Every byte value, and what text-format composites escape: quotes, backslashes, commas,
# parentheses, braces, an empty topic-like string, non-ASCII.
AWKWARD_STATE = bytes(range(256)) + b'\\"(),{} \x00\\\\' + "é😀".encode()
AWKWARD_TOPIC = 'domain.request:Request.Submitted "quoted" \\ back, (paren) {brace} é'


def stored(originator_id: uuid.UUID, version: int, state: bytes = AWKWARD_STATE) -> StoredEvent:
    return StoredEvent(
        originator_id=originator_id, originator_version=version, topic=AWKWARD_TOPIC, state=state
    )


def test_the_store_forgeline_opens_records_with_the_binary_recorder(store: Forgeline) -> None:
    assert isinstance(store.recorder, BinaryInsertRecorder)
    assert "unnest(%b::" in store.recorder.insert_events_statement.as_string(None)


def test_rows_read_back_byte_for_byte_with_their_notification_ids(
    store: Forgeline, database_url: str
) -> None:
    ensure_store_integrity(database_url)
    first, second = uuid.uuid4(), uuid.uuid4()
    events = [stored(first, 1), stored(first, 2, b""), stored(second, 1)]

    ids = store.recorder.insert_events(events)

    assert ids == [1, 2, 3]
    assert list(store.recorder.select_events(first)) == events[:2]
    notifications = store.recorder.select_notifications(start=1, limit=10)
    assert [(n.id, n.originator_id, n.state, n.topic) for n in notifications] == [
        (1, first, AWKWARD_STATE, AWKWARD_TOPIC),
        (2, first, b"", AWKWARD_TOPIC),
        (3, second, AWKWARD_STATE, AWKWARD_TOPIC),
    ]
    # The hash chains the triggers computed over these rows check out in Python.
    with psycopg.connect(database_url) as conn:
        assert verify(conn).ok


def test_a_version_recorded_already_fails_the_whole_save(store: Forgeline) -> None:
    existing = uuid.uuid4()
    store.recorder.insert_events([stored(existing, 1)])

    with pytest.raises(IntegrityError):
        store.recorder.insert_events([stored(uuid.uuid4(), 1), stored(existing, 1)])

    assert len(store.recorder.select_notifications(start=1, limit=10)) == 1

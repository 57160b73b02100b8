"""Tamper evidence for the event store, enforced and computed by Postgres, checked by `verify`.

Every row of `forgeline_events` carries, filled in by a BEFORE INSERT trigger:

- `state_hash`    sha256(state)
- `event_hash`    sha256(previous event_hash of the same aggregate, or 32 zero bytes
                  || originator_id (16 bytes) || originator_version (int8, big-endian)
                  || length of topic (int4) || topic (UTF-8) || state_hash)
- `chain_hash`    sha256(previous row's chain_hash, or 32 zero bytes
                  || notification_id (int8) || event_hash)          -- the global chain
- `prev_position` the notification_id of the previous row (0 for the first)

so changing, removing or inserting a row breaks a chain that `verify()` recomputes here in
Python, independently of the functions stored in the database. Statement-level triggers refuse
UPDATE, DELETE and TRUNCATE for every role, superusers included (unless a superuser or the
table's owner disables them: that is what an auditor looks for), and PUBLIC holds none of
those privileges.

`install()` runs at every start-up, idempotently, under the schema advisory lock; on a store
written before it existed, it first computes the hashes of the rows already there.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from domain.application import EVENTS_TABLE
from projections.schema import SCHEMA_LOCK_KEY

log = logging.getLogger(__name__)

ZERO_HASH = bytes(32)
HASH_COLUMNS = ("state_hash", "event_hash", "chain_hash", "prev_position")
HASH_TRIGGER = "forgeline_events_hash"
LOCK_TRIGGER = "forgeline_events_serialise"
GUARD_TRIGGER = "forgeline_events_append_only"
MIN_SERVER_VERSION = 110000  # sha256(bytea) is built in from Postgres 11


class StoreIntegrityError(RuntimeError):
    """The integrity machinery cannot be installed; the message says why."""


# ----------------------------------------------------------------------------- the formula


def event_digest(
    prev_event_hash: bytes, originator_id: UUID, version: int, topic: str, state_hash: bytes
) -> bytes:
    """The per-aggregate chain link, exactly as the trigger computes it."""
    topic_bytes = topic.encode("utf-8")
    return hashlib.sha256(
        prev_event_hash
        + originator_id.bytes
        + version.to_bytes(8, "big", signed=True)
        + len(topic_bytes).to_bytes(4, "big", signed=True)
        + topic_bytes
        + state_hash
    ).digest()


def chain_digest(prev_chain_hash: bytes, position: int, event_hash: bytes) -> bytes:
    """The global chain link, exactly as the trigger computes it."""
    return hashlib.sha256(
        prev_chain_hash + position.to_bytes(8, "big", signed=True) + event_hash
    ).digest()


# ------------------------------------------------------------------------------- the SQL

_HASH_FUNCTION_BODY = """
DECLARE
    prev_event bytea;
    prev_chain bytea;
    prev_pos bigint;
    topic_bytes bytea := convert_to(coalesce(NEW.topic, ''), 'UTF8');
BEGIN
    SELECT e.event_hash INTO prev_event FROM {table} e
     WHERE e.originator_id = NEW.originator_id
       AND e.originator_version < NEW.originator_version
     ORDER BY e.originator_version DESC LIMIT 1;
    SELECT e.chain_hash, e.notification_id INTO prev_chain, prev_pos FROM {table} e
     WHERE e.notification_id < NEW.notification_id
     ORDER BY e.notification_id DESC LIMIT 1;
    NEW.state_hash := sha256(coalesce(NEW.state, ''::bytea));
    NEW.event_hash := sha256(
        coalesce(prev_event, {zero})
        || uuid_send(NEW.originator_id)
        || int8send(NEW.originator_version)
        || int4send(octet_length(topic_bytes))
        || topic_bytes
        || NEW.state_hash);
    NEW.prev_position := coalesce(prev_pos, 0);
    NEW.chain_hash := sha256(
        coalesce(prev_chain, {zero}) || int8send(NEW.notification_id) || NEW.event_hash);
    RETURN NEW;
END
"""

# eventsourcing already holds this lock when it inserts (it is how it keeps commit order equal
# to notification order); taking it again is free, and makes any other inserter wait its turn,
# so the previous row the hash trigger reads is always the one committed before.
_LOCK_FUNCTION_BODY = """
BEGIN
    LOCK TABLE {table} IN EXCLUSIVE MODE;
    RETURN NULL;
END
"""

_GUARD_FUNCTION_BODY = """
BEGIN
    RAISE EXCEPTION '% on {name} refused: the event store is append-only', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Events are facts: record a new event instead of changing an old one.';
END
"""


@dataclass
class InstallReport:
    created: list[str] = field(default_factory=list)  # what this call created or changed
    backfilled: int = 0  # rows hashed that predate the triggers
    reenabled: list[str] = field(default_factory=list)  # triggers found disabled
    failed: str | None = None  # why this role could not install what was missing


def install(conn: psycopg.Connection[Any]) -> InstallReport:
    """Adds the hash columns, functions and triggers the store lacks; idempotent and cheap when
    everything is there (no table lock then). Takes the schema advisory lock."""
    report = InstallReport()
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            version = _scalar(conn, "SELECT current_setting('server_version_num')::int")
            if int(version) < MIN_SERVER_VERSION:
                raise StoreIntegrityError(
                    f"Postgres {version} has no built-in sha256(); Forgeline needs Postgres 11+"
                )
            schema, table = _events_table(conn)
            _add_columns(conn, table, report)
            triggers = _triggers(conn)
            first_install = HASH_TRIGGER not in triggers and GUARD_TRIGGER not in triggers
            _create_functions(conn, schema, table, report)
            if first_install:
                conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
                report.backfilled = _backfill(conn, table)
            _create_triggers(conn, schema, table, triggers, report)
    except psycopg.errors.InsufficientPrivilege as exc:
        # A role that does not own the table (the recommended deployment) cannot change it:
        # everything was installed by the owner, or must be. Not fatal: verify reports it.
        report = InstallReport(failed=str(exc).splitlines()[0])
        log.error(
            "event store integrity: cannot install or repair the hash and append-only triggers"
            " as this role (%s); run Forgeline once as the owner of %s, and check with"
            " `forgeline verify`",
            report.failed,
            EVENTS_TABLE,
        )
        return report
    if report.created or report.backfilled:
        log.info(
            "event store integrity: created %s; hashed %d earlier events",
            ", ".join(report.created) or "nothing",
            report.backfilled,
        )
    for name in report.reenabled:
        log.warning("event store integrity: trigger %s was disabled; enabled it again", name)
    return report


def ensure_store_integrity(database_url: str) -> InstallReport:
    """install() on a connection of its own (for the composition root)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return install(conn)


def _scalar(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _events_table(conn: psycopg.Connection[Any]) -> tuple[str, sql.Identifier]:
    """The events table's schema, and its schema-qualified name (trigger functions must not
    depend on the caller's search_path)."""
    row = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass(%s)",
        (EVENTS_TABLE,),
    ).fetchone()
    if row is None:
        raise StoreIntegrityError(f"table {EVENTS_TABLE} does not exist (open the store first)")
    return str(row[0]), sql.Identifier(row[0], row[1])


def _add_columns(
    conn: psycopg.Connection[Any], table: sql.Composable, report: InstallReport
) -> None:
    present = _columns(conn)
    missing = [name for name in HASH_COLUMNS if name not in present]
    if not missing:
        return
    types = {"prev_position": "bigint"}
    conn.execute(
        sql.SQL("ALTER TABLE {} ").format(table)
        + sql.SQL(", ").join(
            sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(
                sql.Identifier(name), sql.SQL(types.get(name, "bytea"))
            )
            for name in missing
        )
    )
    for name, text in {
        "state_hash": "sha256(state)",
        "event_hash": "sha256 chained over the events of one aggregate (docs/audit.md)",
        "chain_hash": "sha256 chained over every event in notification_id order (docs/audit.md)",
        "prev_position": "notification_id of the previous event (0 for the first)",
    }.items():
        conn.execute(
            sql.SQL("COMMENT ON COLUMN {}.{} IS {}").format(
                table, sql.Identifier(name), sql.Literal(text)
            )
        )
    report.created.append("columns " + ", ".join(missing))


def _function_bodies(conn: psycopg.Connection[Any], table: sql.Composable) -> dict[str, str]:
    qualified = table.as_string(conn)
    zero = "'\\x" + "00" * 32 + "'::bytea"
    return {
        HASH_TRIGGER: _HASH_FUNCTION_BODY.format(table=qualified, zero=zero),
        LOCK_TRIGGER: _LOCK_FUNCTION_BODY.format(table=qualified),
        GUARD_TRIGGER: _GUARD_FUNCTION_BODY.format(name=EVENTS_TABLE),
    }


def _create_functions(
    conn: psycopg.Connection[Any], schema: str, table: sql.Composable, report: InstallReport
) -> None:
    existing = dict(
        conn.execute(
            "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n"
            " ON n.oid = p.pronamespace WHERE p.proname = ANY(%s) AND n.nspname = %s",
            ([HASH_TRIGGER, LOCK_TRIGGER, GUARD_TRIGGER], schema),
        ).fetchall()
    )
    for name, body in _function_bodies(conn, table).items():
        if existing.get(name) == body:
            continue
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}"
            ).format(sql.Identifier(schema, name), sql.Literal(body))
        )
        report.created.append(f"function {name}")


def _triggers(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """Name -> tgenabled ('O' on, 'D' disabled, ...) of the events table's own triggers."""
    rows = conn.execute(
        "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = to_regclass(%s)"
        " AND NOT tgisinternal",
        (EVENTS_TABLE,),
    ).fetchall()
    return {str(name): str(enabled) for name, enabled in rows}


def _create_triggers(
    conn: psycopg.Connection[Any],
    schema: str,
    table: sql.Composable,
    triggers: dict[str, str],
    report: InstallReport,
) -> None:
    definitions = {
        LOCK_TRIGGER: "BEFORE INSERT ON {table} FOR EACH STATEMENT",
        HASH_TRIGGER: "BEFORE INSERT ON {table} FOR EACH ROW",
        # Statement level: fires even for an UPDATE or DELETE that matches no row.
        GUARD_TRIGGER: "BEFORE UPDATE OR DELETE OR TRUNCATE ON {table} FOR EACH STATEMENT",
    }
    for name, when in definitions.items():
        state = triggers.get(name)
        if state is None:
            conn.execute(
                sql.SQL("CREATE TRIGGER {name} " + when + " EXECUTE FUNCTION {function}()").format(
                    name=sql.Identifier(name),
                    table=table,
                    function=sql.Identifier(schema, name),
                )
            )
            report.created.append(f"trigger {name}")
        elif state == "D":
            conn.execute(
                sql.SQL("ALTER TABLE {} ENABLE TRIGGER {}").format(table, sql.Identifier(name))
            )
            report.reenabled.append(name)
    if GUARD_TRIGGER not in triggers:
        conn.execute(sql.SQL("REVOKE UPDATE, DELETE, TRUNCATE ON {} FROM PUBLIC").format(table))


def _backfill(conn: psycopg.Connection[Any], table: sql.Composable, chunk: int = 5000) -> int:
    """Hashes the rows written before the triggers existed, in notification order (the caller
    holds the table's EXCLUSIVE lock, so no row is added meanwhile)."""
    update = sql.SQL(
        "UPDATE {} SET state_hash = %s, event_hash = %s, chain_hash = %s,"
        " prev_position = %s WHERE notification_id = %s"
    ).format(table)
    prev_by_aggregate: dict[UUID, bytes] = {}
    prev_chain, prev_position = ZERO_HASH, 0
    updates: list[tuple[bytes, bytes, bytes, int, int]] = []
    total = 0
    with conn.cursor(name="forgeline_backfill") as rows, conn.cursor() as cur:
        rows.itersize = chunk
        rows.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state"
                " FROM {} ORDER BY notification_id"
            ).format(table)
        )
        for position, originator_id, version, topic, state in rows:
            state_hash = hashlib.sha256(bytes(state or b"")).digest()
            ev = event_digest(
                prev_by_aggregate.get(originator_id, ZERO_HASH),
                originator_id,
                version,
                topic or "",
                state_hash,
            )
            chain = chain_digest(prev_chain, position, ev)
            updates.append((state_hash, ev, chain, prev_position, position))
            prev_by_aggregate[originator_id] = ev
            prev_chain, prev_position = chain, position
            if len(updates) >= chunk:
                cur.executemany(update, updates)
                total += len(updates)
                updates.clear()
        if updates:
            cur.executemany(update, updates)
            total += len(updates)
    return total


# ---------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Break:
    """The first place where the stored events and their hashes disagree."""

    position: int
    aggregate: str  # "Request", "Run", or the topic when it names no aggregate
    aggregate_id: str
    version: int
    kind: str  # unhashed | state | version_gap | event | missing_events | chain | anchor
    message: str
    stored: str | None = None  # hex
    recomputed: str | None = None  # hex
    column: str | None = None  # which hash column stored/recomputed are of

    def as_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "aggregate": self.aggregate,
            "aggregate_id": self.aggregate_id,
            "version": self.version,
            "kind": self.kind,
            "message": self.message,
            "stored": self.stored,
            "recomputed": self.recomputed,
            "column": self.column,
        }


@dataclass
class VerifyResult:
    events: int = 0
    aggregates: int = 0
    head_position: int = 0
    head_chain: str = ZERO_HASH.hex()
    first_break: Break | None = None

    @property
    def ok(self) -> bool:
        return self.first_break is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events_checked": self.events,
            "aggregates": self.aggregates,
            "head": {"position": self.head_position, "chain_hash": self.head_chain},
            "break": None if self.first_break is None else self.first_break.as_dict(),
        }


def aggregate_of(topic: str | None) -> str:
    """'domain.run:Run.RunQueued' -> 'Run'."""
    if not topic or ":" not in topic:
        return topic or "?"
    return topic.split(":", 1)[1].split(".", 1)[0]


def verify(
    conn: psycopg.Connection[Any],
    *,
    progress: Callable[[int], None] | None = None,
    anchors: Iterable[tuple[int, str]] = (),
    batch: int = 10_000,
) -> VerifyResult:
    """Walks every stored event in position order and recomputes both chains; stops at the
    first break. anchors: (position, chain hash hex) pairs recorded earlier, e.g. printed by an
    earlier verify, which must still be there (catches a truncated tail)."""
    result = VerifyResult()
    with conn.transaction():
        missing = [c for c in HASH_COLUMNS if c not in _columns(conn)]
    if missing:
        result.first_break = Break(
            0, "", "", 0, "unhashed", f"the events table has no {', '.join(missing)} column(s)"
        )
        return result
    wanted = {position: chain.lower() for position, chain in anchors}
    prev_by_aggregate: dict[UUID, tuple[int, bytes]] = {}
    prev_chain, prev_position = ZERO_HASH, 0
    seen_anchors: dict[int, str] = {}
    with conn.transaction(), conn.cursor(name="forgeline_verify") as cur:
        cur.itersize = batch
        cur.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state,"
                " state_hash, event_hash, chain_hash, prev_position FROM {}"
                " ORDER BY notification_id"
            ).format(sql.Identifier(EVENTS_TABLE))
        )
        done = 0
        for row in cur:
            position, oid, version, e_hash, c_hash = (row[i] for i in (0, 1, 2, 6, 7))
            found = _check_row(row, prev_by_aggregate.get(oid), prev_chain, prev_position)
            if found is not None:
                result.first_break = found
                break
            prev_by_aggregate[oid] = (version, bytes(e_hash))
            prev_chain, prev_position = bytes(c_hash), position
            if position in wanted:
                seen_anchors[position] = prev_chain.hex()
            result.events += 1
            done += 1
            if progress is not None and done == batch:
                progress(done)
                done = 0
        if progress is not None and done:
            progress(done)
    result.aggregates = len(prev_by_aggregate)
    result.head_position, result.head_chain = prev_position, prev_chain.hex()
    if result.first_break is None:
        for position, chain in sorted(wanted.items()):
            if seen_anchors.get(position) != chain:
                result.first_break = Break(
                    position,
                    "",
                    "",
                    0,
                    "anchor",
                    f"anchored position {position} "
                    + (
                        "is gone: events at the end of the store were removed"
                        if position not in seen_anchors
                        else "has another chain hash: history up to it was rewritten"
                    ),
                    stored=seen_anchors.get(position),
                    recomputed=chain,
                    column="chain_hash",
                )
                break
    return result


def _columns(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attnum > 0 AND NOT attisdropped",
        (EVENTS_TABLE,),
    ).fetchall()
    return {str(name) for (name,) in rows}


def _check_row(
    row: tuple[Any, ...],
    previous_of_aggregate: tuple[int, bytes] | None,
    prev_chain: bytes,
    prev_position: int,
) -> Break | None:
    position, oid, version, topic, state, s_hash, e_hash, c_hash, prev_pos = row

    def brk(
        kind: str,
        message: str,
        stored: Any = None,
        recomputed: Any = None,
        column: str | None = None,
    ) -> Break:
        return Break(
            position,
            aggregate_of(topic),
            str(oid),
            int(version),
            kind,
            message,
            bytes(stored).hex() if stored is not None else None,
            bytes(recomputed).hex() if recomputed is not None else None,
            column,
        )

    if s_hash is None or e_hash is None or c_hash is None or prev_pos is None:
        return brk(
            "unhashed",
            "the event has no hashes: it was written with the hash trigger disabled, or its "
            "hash columns were cleared",
        )
    state_hash = hashlib.sha256(bytes(state or b"")).digest()
    if state_hash != bytes(s_hash):
        return brk(
            "state", "the event's payload (state) was changed", s_hash, state_hash, "state_hash"
        )
    last_version, prev_event = previous_of_aggregate or (0, ZERO_HASH)
    expected = event_digest(prev_event, oid, version, topic or "", state_hash)
    if expected != bytes(e_hash):
        if version > last_version + 1:
            return brk(
                "version_gap",
                f"version(s) {last_version + 1}..{version - 1} of this aggregate are missing "
                "(deleted?)",
                e_hash,
                expected,
                "event_hash",
            )
        return brk(
            "event",
            "the event's aggregate id, version or topic was changed, or its event hash was "
            "rewritten",
            e_hash,
            expected,
            "event_hash",
        )
    if int(prev_pos) != prev_position:
        return brk(
            "missing_events",
            f"the event follows position {prev_pos}, but the stored event before it is at "
            f"position {prev_position}: events were removed or inserted in between",
        )
    expected_chain = chain_digest(prev_chain, position, expected)
    if expected_chain != bytes(c_hash):
        return brk(
            "chain",
            "the global chain hash differs: the chain was rewritten at this position",
            c_hash,
            expected_chain,
            "chain_hash",
        )
    return None


def protection_status(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """Each integrity trigger: 'enabled', 'disabled' or 'missing'."""
    with conn.transaction():
        found = _triggers(conn)
    states = {"O": "enabled", "A": "enabled", "D": "disabled", "R": "replica only"}
    return {
        name: states.get(found[name], found[name]) if name in found else "missing"
        for name in (LOCK_TRIGGER, HASH_TRIGGER, GUARD_TRIGGER)
    }

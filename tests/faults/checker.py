"""The invariants of a scenario, read from the event store and reported as numbers.

- every accepted request (a 202 the load got) is in the store with its run (else `lost`), and
  that run ended (`terminal`), or is still moving within the lease time (`progressing`); a run
  with no event for longer than that is `stuck`;
- nothing is recorded twice (`duplicated`: a second request for one Idempotency-Key or command,
  a second run of a request, a second terminal event of a run, an event twice on the stream);
- per aggregate, versions are 1..n without a gap (`version_gaps`);
- the read tables equal a replay of the store (`projection_mismatches`, rows that differ);
- FORGELINE_EVENTS holds each stored event once (`stream_missing`, duplicates under
  `duplicated`);
- nothing is left behind: workspace containers of this installation, local workspace folders,
  agent processes (`leaked_*`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import ServiceUnavailableError
from psycopg import sql

from broker import subjects
from broker.connection import connect
from domain.application import Forgeline
from projections.replay import replay
from projections.schema import LIVE_PREFIX, POSITIONS_TABLE, tables
from tests.faults.load import FAILS, LoadResult

TERMINAL_EVENTS = {"RunSucceeded": "succeeded", "RunFailed": "failed", "RunCancelled": "cancelled"}
INSTALLATION_LABEL = "org.forgeline.installation"  # on every workspace container


@dataclass
class Report:
    scenario: str
    injected: str
    requests: int = 0  # submitted by the load
    accepted: int = 0  # 202s
    given_up: int = 0  # never accepted (the client gave up after retrying)
    client_retries: int = 0  # HTTP attempts beyond the first
    recorded: int = 0  # accepted requests found in the store with their run
    lost: int = 0
    terminal: dict[str, int] = field(default_factory=dict)  # status -> runs
    failed: dict[str, int] = field(default_factory=dict)  # failure code -> runs
    failure_messages: dict[str, list[str]] = field(default_factory=dict)  # code -> a few
    # runs that did not end as their agent meant (a fast/slow one not succeeding, a failing
    # one not failing agent_failed): "kind status[/code]" -> runs
    unexpected: dict[str, int] = field(default_factory=dict)
    recovered: int = 0  # ended runs that needed more than one attempt
    attempts: dict[str, int] = field(default_factory=dict)  # attempts -> runs
    progressing: int = 0
    stuck: int = 0
    duplicated: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    version_gaps: int = 0
    projection_mismatches: int = 0
    store_events: int = 0
    stream_missing: int = 0
    leaked_containers: int = 0
    # Containers the engine itself marked dead: its removal failed inside Docker ("driver
    # overlay2 failed to remove root filesystem ... device or resource busy", a mount held by
    # a runtime process the stopped engine left behind). Reported, not Forgeline's leak.
    engine_dead_containers: int = 0
    leaked_workspaces: int = 0
    leaked_agents: int = 0
    role_restarts: dict[str, int] = field(default_factory=dict)  # by the supervisor
    stop_codes: dict[str, int | None] = field(default_factory=dict)  # on SIGTERM at the end
    seconds: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self, allowed_unexpected: Sequence[str] = ()) -> list[str]:
        """What breaks an invariant; `allowed_unexpected` are outcomes a fault may cause
        (e.g. "slow failed/workspace_failed" when the engine dies under a running agent)."""
        found = [
            f"{name} = {value}"
            for name, value in (
                ("lost", self.lost),
                ("stuck", self.stuck),
                ("duplicated", self.duplicated),
                ("version_gaps", self.version_gaps),
                ("projection_mismatches", self.projection_mismatches),
                ("stream_missing", self.stream_missing),
                ("leaked_containers", self.leaked_containers),
                ("leaked_workspaces", self.leaked_workspaces),
                ("leaked_agents", self.leaked_agents),
                ("given_up", self.given_up),
            )
            if value
        ]
        allowed = set(allowed_unexpected)
        found += [f"unexpected {k}: {n}" for k, n in self.unexpected.items() if k not in allowed]
        return found


@dataclass
class _RunFacts:
    request_id: UUID | None = None
    events: list[str] = field(default_factory=list)
    attempt: int = 0
    code: str | None = None
    message: str = ""
    last_at: datetime | None = None


@dataclass
class StoreFacts:
    """What the checks need, in one pass over the store."""

    events: int = 0
    last_position: int = 0
    versions: dict[UUID, list[int]] = field(default_factory=lambda: defaultdict(list))
    requests: dict[UUID, list[Any]] = field(default_factory=lambda: defaultdict(list))
    reruns: Counter[UUID] = field(default_factory=Counter)
    runs: dict[UUID, _RunFacts] = field(default_factory=lambda: defaultdict(_RunFacts))


def read_store(app: Forgeline, batch: int = 2000) -> StoreFacts:
    facts = StoreFacts()
    start = 0
    while notes := app.recorder.select_notifications(
        start=start, limit=batch, inclusive_of_start=False
    ):
        for note in notes:
            facts.events += 1
            facts.last_position = note.id
            facts.versions[note.originator_id].append(note.originator_version)
            _note_event(facts, app.mapper.to_domain_event(note))
        start = notes[-1].id
    return facts


def _note_event(facts: StoreFacts, event: Any) -> None:
    name = type(event).__name__
    if name == "RequestSubmitted":
        facts.requests[event.originator_id].append(event)
    elif name == "RerunRequested":
        facts.reruns[event.originator_id] += 1
    elif type(event).__qualname__.startswith("Run."):
        run = facts.runs[event.originator_id]
        run.events.append(name)
        run.last_at = event.timestamp
        if name == "RunQueued":
            run.request_id = event.request_id
        elif name == "ProvisioningStarted":
            run.attempt = event.attempt
        elif name == "RunFailed":
            run.code, run.message = event.code, event.message


def check_store(report: Report, facts: StoreFacts, load: LoadResult, lease_s: float) -> None:
    """Fills the store's part of the report: lost, terminal, duplicated, version gaps."""
    now = datetime.now(UTC)
    report.requests = len(load.accepted) + len(load.given_up)
    report.accepted = len(load.accepted)
    report.given_up = len(load.given_up)
    report.client_retries = load.retries
    report.store_events = facts.events
    terminal: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    attempts: Counter[str] = Counter()
    for accepted in load.accepted:
        run = facts.runs.get(UUID(accepted.run_id))
        if UUID(accepted.request_id) not in facts.requests or run is None or not run.events:
            report.lost += 1
            continue
        report.recorded += 1
        ends = [TERMINAL_EVENTS[e] for e in run.events if e in TERMINAL_EVENTS]
        attempts[str(run.attempt)] += 1
        if not ends:
            young = run.last_at is not None and (now - run.last_at).total_seconds() < lease_s
            report.progressing += young
            report.stuck += not young
            continue
        status = ends[-1]
        terminal[status] += 1
        if status == "failed":
            failed[run.code or "?"] += 1
            samples = report.failure_messages.setdefault(run.code or "?", [])
            if run.message not in samples and len(samples) < 5:
                samples.append(run.message)
        report.recovered += run.attempt > 1
        meant = ("failed", "agent_failed") if accepted.kind == FAILS else ("succeeded", None)
        if (status, run.code) != meant:
            outcome = status if run.code is None else f"{status}/{run.code}"
            unexpected[f"{accepted.kind} {outcome}"] += 1
    report.terminal, report.failed = dict(terminal), dict(failed)
    report.unexpected, report.attempts = dict(unexpected), dict(sorted(attempts.items()))

    dup = report.duplicates
    keys = Counter(e.idempotency_key for evs in facts.requests.values() for e in evs)
    dup["requests_per_idempotency_key"] = sum(n - 1 for k, n in keys.items() if k and n > 1)
    commands = Counter(e.command_id for evs in facts.requests.values() for e in evs)
    dup["requests_per_command"] = sum(n - 1 for n in commands.values() if n > 1)
    dup["submitted_events_per_request"] = sum(len(evs) - 1 for evs in facts.requests.values())
    runs_of: Counter[UUID] = Counter(r.request_id for r in facts.runs.values() if r.request_id)
    dup["runs_per_request"] = sum(
        max(0, n - 1 - facts.reruns[request]) for request, n in runs_of.items()
    )
    dup["terminal_events_per_run"] = sum(
        max(0, sum(e in TERMINAL_EVENTS for e in r.events) - 1) for r in facts.runs.values()
    )
    report.version_gaps = sum(
        sorted(v) != list(range(1, len(v) + 1)) for v in facts.versions.values()
    )


def projector_position(database_url: str) -> int:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute(
            f"SELECT position FROM {POSITIONS_TABLE} WHERE name = %s", (f"{LIVE_PREFIX}tables",)
        ).fetchone()
    return int(row[0]) if row else 0


def projection_mismatches(app: Forgeline, database_url: str) -> int:
    """Rows of the live read tables that differ from a replay of the whole store (the projector
    must have applied everything: see projector_position)."""
    replayed = replay(app, keep_diffs=True).table_rows()
    live_requests, live_runs = tables(LIVE_PREFIX)
    mismatches = 0
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        for name, table in (("requests", live_requests), ("runs", live_runs)):
            live = conn.execute(sql.SQL("SELECT * FROM {} ORDER BY id").format(table)).fetchall()
            mine = {row[0]: tuple(row) for row in replayed[name]}
            theirs = {row[0]: tuple(row) for row in live}
            mismatches += sum(mine.get(k) != theirs.get(k) for k in mine.keys() | theirs.keys())
    return mismatches


async def stream_positions(nats_url: str) -> Counter[int]:
    """How many times each store position is on FORGELINE_EVENTS."""
    nc = await connect(nats_url, name="faults-checker")
    try:
        js = nc.jetstream()
        total = (await js.stream_info(subjects.EVENTS_STREAM)).state.messages
        sub = await js.pull_subscribe(
            subjects.EVENTS_SUBJECTS,
            stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30
            ),
        )
        seen: Counter[int] = Counter()
        while sum(seen.values()) < total:
            for msg in await sub.fetch(500, timeout=10):
                seen[int(json.loads(msg.data)["position"])] += 1
        await sub.unsubscribe()
        return seen
    finally:
        await nc.close()


async def _stream_messages(nats_url: str) -> int:
    nc = await connect(nats_url, name="faults-probe")
    try:
        info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()


T = TypeVar("T")


def _when_jetstream_answers(read: Callable[[], T], attempts: int = 15) -> T:
    """read(), again while JetStream answers 503 or not at all: a cluster whose killed node just
    came back may move a stream's leader for a few seconds after the load settled."""
    for attempt in range(attempts):
        try:
            return read()
        except (ServiceUnavailableError, NatsTimeoutError, NoRespondersError):
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def stream_messages(nats_url: str) -> int:
    """How many messages FORGELINE_EVENTS holds."""
    return _when_jetstream_answers(lambda: asyncio.run(_stream_messages(nats_url)))


def check_stream(report: Report, facts: StoreFacts, nats_url: str) -> None:
    seen = _when_jetstream_answers(lambda: asyncio.run(stream_positions(nats_url)))
    report.duplicates["stream_messages_per_event"] = sum(n - 1 for n in seen.values() if n > 1)
    report.stream_missing = facts.events - len(seen)


def installation(database_url: str) -> str | None:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT id FROM forgeline_installation").fetchone()
    return str(row[0]) if row else None


def containers_of(docker_url: str, installation_id: str, *, dead: bool = False) -> list[str]:
    """The installation's containers the engine lists; without dead, those whose removal did
    not fail inside the engine itself (with dead: those it did, see engine_dead_containers).
    The engine's own record says which: State.Dead, or an Error from its storage driver. A
    container the reaper is retrying shows "removing" for a moment, so `ps`'s state alone
    cannot tell (a CI run once counted such a one as leaked)."""
    docker = ["docker", "-H", docker_url]
    listed = subprocess.run(
        [*docker, "ps", "-aq", "--filter", f"label={INSTALLATION_LABEL}={installation_id}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    if not listed:
        return []
    inspected = subprocess.run(
        [*docker, "inspect", "--format", "{{.Id}}\t{{.State.Dead}}\t{{.State.Error}}", *listed],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,  # a container removed since it was listed is not an error
    ).stdout
    found = []
    for line in inspected.splitlines():
        container_id, is_dead, error = [*line.split("\t", 2), "", ""][:3]
        engine_failed = is_dead == "true" or "failed to remove root filesystem" in error
        if engine_failed == dead:
            found.append(container_id[:12])
    return found


def leftover_workspaces(dirs: Sequence[Path]) -> list[Path]:
    return [entry for d in dirs if d.exists() for entry in d.iterdir()]


def leftover_agents(root: Path) -> list[int]:
    """Agent processes of a local workspace under root (they carry FORGELINE_WORKSPACE)."""
    prefix = f"FORGELINE_WORKSPACE={root.resolve()}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if any(item.startswith(prefix) for item in environ.split(b"\0")):
                found.append(int(entry.name))
    return found


def finish(report: Report) -> None:
    report.duplicated = sum(report.duplicates.values())

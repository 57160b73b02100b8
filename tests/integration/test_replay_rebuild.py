"""Time travel and live rebuilds on real Postgres.

Replay: while a scenario is written, the live projector's tables are snapshotted after every
save; replaying the store to each snapshot's position (or time) must give exactly those rows.

Rebuild: with writers writing, the live projector running and readers reading through the
API's queries, rebuilds swap new tables in; no reader errs or sees a request vanish, every
event reaches the live tables exactly once, and they end equal to a rebuild from scratch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from domain.application import Forgeline
from forgeline.bootstrap import open_store
from forgeline.store_integrity import ensure_store_integrity
from projections.rebuild import FRESH_PREFIX, RebuildError, rebuild_and_swap
from projections.replay import replay, replay_request
from projections.runner import PositionMoved, ProjectionRunner
from projections.schema import LIVE_PREFIX, POSITIONS_TABLE
from projections.views import Views
from tests.integration.conftest import in_thread, store_positions
from tests.integration.test_audit import clock, forgeline  # noqa: F401  (clock: a fixture)
from tests.integration.test_projections import (
    Scenario,
    applied_position,
    caught_up,
    log_position_updates,
    position_updates,
    rebuilt_rows,
    running,
    table_rows,
)

LIVE_NAME = f"{LIVE_PREFIX}tables"


@pytest.fixture
def app(database_url: str) -> Iterator[Forgeline]:
    store = open_store(database_url)
    ensure_store_integrity(database_url)
    yield store
    store.close()


@dataclass
class Snapshot:
    position: int
    rows: dict[str, list[tuple[Any, ...]]]


def play_with_snapshots(app: Forgeline, url: str, bulk: int) -> tuple[Scenario, list[Snapshot]]:
    """Plays the scenario; after every save the live projector catches up and its tables are
    snapshotted, as a reader of the API would have seen them at that position."""
    live = ProjectionRunner(app, url, batch_size=3)
    live.create_tables()
    snapshots: list[Snapshot] = []
    save = app.save

    def save_and_snapshot(*aggregates: Any, **kwargs: Any) -> Any:
        recordings = save(*aggregates, **kwargs)
        live.catch_up()
        snapshots.append(Snapshot(applied_position(url, LIVE_PREFIX), table_rows(url, LIVE_PREFIX)))
        return recordings

    app.save = save_and_snapshot  # type: ignore[method-assign]
    scenario = Scenario(app)
    try:
        scenario.play(bulk)
    finally:
        app.save = save  # type: ignore[method-assign]
        live.close()
    return scenario, snapshots


@pytest.mark.usefixtures("clock")  # event times strictly increase, a millisecond apart
def test_replay_at_every_position_equals_the_live_tables_then(
    app: Forgeline, database_url: str
) -> None:
    scenario, snapshots = play_with_snapshots(app, database_url, bulk=6)
    assert len(snapshots) > 40
    timestamps = {
        position: event.timestamp
        for position, event in (
            (n.id, app.mapper.to_domain_event(n))
            for n in app.recorder.select_notifications(start=1, limit=10_000)
        )
    }
    for snapshot in snapshots:
        by_position = replay(app, position=snapshot.position, keep_diffs=True, batch_size=7)
        assert by_position.position == snapshot.position
        assert by_position.table_rows() == snapshot.rows, snapshot.position
        # As of the time of that position's event: the same state.
        as_of = replay(app, as_of=timestamps[snapshot.position], keep_diffs=True)
        assert as_of.position == snapshot.position
        assert as_of.table_rows() == snapshot.rows, snapshot.position

    # Before the first event, nothing; one request alone reads only its events, same answer.
    assert replay(app, position=0).requests == {}
    middle = snapshots[len(snapshots) // 2].position
    whole = replay(app, position=middle)
    with psycopg.connect(database_url) as conn:
        for story in scenario.stories.values():
            alone = replay_request(app, conn, story.request_id, position=middle)
            assert alone.request_view(story.request_id) == whole.request_view(story.request_id)


async def test_replay_shows_requests_as_the_api_did(app: Forgeline, database_url: str) -> None:
    scenario = Scenario(app)
    await in_thread(scenario.play, 10)
    live = ProjectionRunner(app, database_url)
    await in_thread(live.create_tables)
    await in_thread(live.catch_up)
    live.close()
    state = await in_thread(lambda: replay(app))
    async with AsyncConnectionPool(database_url, min_size=1, open=False) as pool:
        views = Views(pool)
        for request_id in state.requests:
            assert await views.get_request(request_id) == state.request_view(request_id)
        listed, _ = await views.list_requests(status=None, limit=500, cursor=None)
    assert listed == [{**view, "runs": []} for view in state.request_views()]

    position = store_positions(database_url)[25]
    code, out = await in_thread(
        lambda: forgeline(database_url, "replay", "--position", str(position), "--json")
    )
    assert code == 0
    shown = json.loads(out)
    assert shown["position"] == position and shown["events_applied"] == 26
    expected = replay(app, position=position).request_views()
    assert shown["requests"] == json.loads(json.dumps(expected))
    story = scenario.stories["rerun_running"]
    code, out = await in_thread(
        lambda: forgeline(
            database_url, "replay", "--position", "9999", "--request", str(story.request_id)
        )
    )
    assert code == 0 and f"request {story.request_id}  running" in out
    assert (await in_thread(lambda: forgeline(database_url, "replay", "--as-of", "noon")))[0] == 2


# -------------------------------------------------------------------------------- rebuild


def live_table_oids(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT %s::regclass::oid, %s::regclass::oid",
            (f"{LIVE_PREFIX}requests", f"{LIVE_PREFIX}runs"),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def leftovers(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT relname FROM pg_class WHERE relname LIKE %s", (f"{FRESH_PREFIX}%",)
        ).fetchall()
        rows = conn.execute(
            sql.SQL("SELECT name FROM {} WHERE name <> %s").format(sql.Identifier(POSITIONS_TABLE)),
            (LIVE_NAME,),
        ).fetchall()
    return [str(r[0]) for r in tables + rows]


class Writers:
    """Threads writing scenarios through their own apps (as worker processes do) until stopped."""

    def __init__(self, url: str, count: int) -> None:
        self.apps = [open_store(url) for _ in range(count)]
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._write, args=(a,)) for a in self.apps]

    def _write(self, app: Forgeline) -> None:
        try:
            while not self.stop.is_set():
                Scenario(app).play(5)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        for app in self.apps:
            app.close()


class Readers:
    """Reads through the gateway's queries without pause; remembers every error and every
    request that was visible once and then not."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.views = Views(pool)
        self.seen: set[UUID] = set()
        self.errors: list[BaseException] = []
        self.vanished: list[UUID] = []
        self.reads = 0

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(7)
        while not stop.is_set():
            try:
                page, _ = await self.views.list_requests(status=None, limit=20, cursor=None)
                self.seen.update(UUID(item["id"]) for item in page)
                if self.seen:
                    request_id = rng.choice(sorted(self.seen))
                    if await self.views.get_request(request_id) is None:
                        self.vanished.append(request_id)
                    view = await self.views.get_request(request_id)
                    if view is not None and view["runs"]:
                        await self.views.get_run(UUID(view["runs"][-1]["id"]))
                self.reads += 1
            except Exception as exc:
                self.errors.append(exc)
            await asyncio.sleep(0)


async def test_rebuild_while_traffic_flows_loses_nothing(app: Forgeline, database_url: str) -> None:
    live = ProjectionRunner(app, database_url, batch_size=10)
    await in_thread(live.create_tables)
    await in_thread(log_position_updates, database_url)
    oids = {await in_thread(live_table_oids, database_url)}
    stop_reading = asyncio.Event()
    rebuilds: list[tuple[int, int, Any]] = []  # (store head before, after, result)

    def rebuild_several() -> None:
        time.sleep(0.5)
        for n in range(6):
            before = store_positions(database_url)[-1]
            if n == 2:  # once through the command, as an operator runs it
                code, out = forgeline(database_url, "projections", "rebuild", "views")
                assert code == 0 and out.startswith("rebuilt views: "), out
                result = out
            else:
                result = rebuild_and_swap(app, database_url, batch_size=50, bulk=n != 1)
            rebuilds.append((before, store_positions(database_url)[-1], result))
            oids.add(live_table_oids(database_url))
            time.sleep(0.4)

    async with AsyncConnectionPool(database_url, min_size=2, max_size=4, open=False) as pool:
        readers = Readers(pool)
        reading = asyncio.create_task(readers.run(stop_reading))
        try:
            async with running(live):
                with Writers(database_url, 2) as writers:
                    await in_thread(rebuild_several)
                assert writers.errors == []
                await caught_up(database_url, LIVE_PREFIX)
        finally:
            stop_reading.set()
            await reading
    live.close()

    assert len(oids) == 7, "each rebuild swapped new tables in"
    assert any(after > before for before, after, _ in rebuilds), "writes went on meanwhile"
    assert readers.errors == []
    assert readers.vanished == []
    assert readers.reads > 100 and len(readers.seen) > 50

    # Exactly once: each committed move of the live position starts where the last one ended
    # (the swaps included), and the tables equal a rebuild from scratch.
    steps = await in_thread(position_updates, database_url, LIVE_NAME)
    assert all(prev[1] == step[0] for prev, step in itertools.pairwise(steps))
    assert steps[-1][1] == (await in_thread(store_positions, database_url))[-1]
    fresh = await in_thread(rebuilt_rows, app, database_url, "scratch_")
    assert await in_thread(table_rows, database_url, LIVE_PREFIX) == fresh
    assert await in_thread(leftovers, database_url) == ["scratch_tables"]


def test_a_batch_read_before_the_swap_is_not_applied_after_it(
    app: Forgeline, database_url: str
) -> None:
    """The race made deterministic: the live projector read its position, then a swap moved
    it; its batch must apply nothing (PositionMoved), and it goes on from the new position."""
    Scenario(app).play(4)
    live = ProjectionRunner(app, database_url, batch_size=5)
    live.create_tables()
    live.catch_up()
    stale = live.position()
    Scenario(app).play(4)  # more events the live projector has not applied yet
    result = rebuild_and_swap(app, database_url)
    assert result.position == store_positions(database_url)[-1] > stale
    swapped = table_rows(database_url, LIVE_PREFIX)

    live.position = lambda: stale  # type: ignore[method-assign]
    with pytest.raises(PositionMoved):
        live.process_batch()
    assert table_rows(database_url, LIVE_PREFIX) == swapped
    del live.position  # type: ignore[method-assign]
    assert live.catch_up() == 0  # nothing left: the swapped-in tables hold it all
    Scenario(app).play(1)
    assert live.catch_up() > 0
    live.close()
    assert table_rows(database_url, LIVE_PREFIX) == rebuilt_rows(app, database_url, "scratch_")


def test_the_swap_waits_for_a_batch_in_flight_and_retries(
    app: Forgeline, database_url: str
) -> None:
    Scenario(app).play(3)
    live = ProjectionRunner(app, database_url)
    live.create_tables()
    live.catch_up()
    live.close()
    holding = threading.Event()

    def batch_in_flight() -> None:  # holds the live position row as process_batch does
        with psycopg.connect(database_url) as conn:
            conn.execute(
                sql.SQL("SELECT position FROM {} WHERE name = %s FOR UPDATE").format(
                    sql.Identifier(POSITIONS_TABLE)
                ),
                (LIVE_NAME,),
            )
            holding.set()
            time.sleep(1.6)

    holder = threading.Thread(target=batch_in_flight)
    holder.start()
    holding.wait()
    result = rebuild_and_swap(app, database_url, lock_timeout_s=0.5)
    holder.join()
    assert result.swap_attempts >= 2
    assert leftovers(database_url) == []

    with pytest.raises(RebuildError, match="after 1 attempts"):
        holder = threading.Thread(target=batch_in_flight)
        holding.clear()
        holder.start()
        holding.wait()
        try:
            rebuild_and_swap(app, database_url, lock_timeout_s=0.2, attempts=1)
        finally:
            holder.join()
    assert leftovers(database_url) == []  # the failed rebuild's tables are gone


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "sql"])
def test_rebuild_creates_the_live_tables_when_none_exist(
    app: Forgeline, database_url: str, bulk: bool
) -> None:
    Scenario(app).play(3)
    result = rebuild_and_swap(app, database_url, bulk=bulk)
    assert result.events == len(store_positions(database_url)) == result.position
    assert applied_position(database_url, LIVE_PREFIX) == result.position
    assert table_rows(database_url, LIVE_PREFIX) == rebuilt_rows(app, database_url, "scratch_")
    # A projector starting afterwards keeps the swapped-in tables, indexes and position.
    live = ProjectionRunner(app, database_url)
    live.create_tables()
    assert live.catch_up() == 0
    live.close()
    with psycopg.connect(database_url) as conn:
        indexes = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename LIKE %s ORDER BY 1",
            (f"{LIVE_PREFIX}%",),
        ).fetchall()
    assert [i for (i,) in indexes] == [
        "forgeline_view_requests_newest",
        "forgeline_view_requests_pkey",
        "forgeline_view_requests_status_newest",
        "forgeline_view_runs_pkey",
        "forgeline_view_runs_request",
    ]


def test_rebuild_of_an_unknown_projection_is_refused(app: Forgeline, database_url: str) -> None:
    code, out = forgeline(database_url, "projections", "rebuild", "nonsense")
    assert code == 2 and out == ""
    with pytest.raises(RebuildError, match="no projection named 'nonsense'"):
        rebuild_and_swap(app, database_url, "nonsense")

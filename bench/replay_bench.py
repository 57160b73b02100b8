"""Replay, rebuild and verify speed on N stored events, against a raw SELECT of the same rows.

    python -m bench.replay_bench [--events 1000000] [--database-url URL] [--out DIR]

Writes N events (requests of 7 events each: submitted, queued, claimed, workspace, started,
patch, succeeded; saved 100 requests per transaction, as the store's fast path) into a fresh
database of an embedded Postgres (or of --database-url's server), then measures in the same
run, each in events/s:

- raw SELECT: the same rows (`notification_id, originator_id, originator_version, topic,
  state`) through one server-side cursor, nothing decoded: the floor;
- select_notifications: eventsourcing's reader, in batches, nothing decoded;
- replay: projections.replay.replay (decode + fold in memory), the whole store;
- rebuild: projections.rebuild.rebuild_and_swap, bulk (fold in memory + COPY + the swap)
  and bulk=False (every event applied as the projector's SQL);
- verify: forgeline.store_integrity.verify (both hash chains recomputed).

Before that, the cost of the integrity triggers: the same writes into a store with and without
them (--trigger-events of them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from domain.application import EVENTS_TABLE, Forgeline
from domain.commands import RequestSpec
from domain.request import Request
from forgeline.bootstrap import open_store
from forgeline.settings import eventsourcing_env
from forgeline.store_integrity import ensure_store_integrity, verify
from projections.rebuild import rebuild_and_swap
from projections.replay import replay

EVENTS_PER_REQUEST = 7
REQUESTS_PER_SAVE = 100
DIFF = "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-a\n+b\n"
STATS = {
    "sha256": hashlib.sha256(DIFF.encode()).hexdigest(),
    "bytes": len(DIFF),
    "files_changed": 1,
    "insertions": 1,
    "deletions": 1,
}


@contextmanager
def server(database_url: str | None) -> Iterator[Callable[[str], str]]:
    """A function making a fresh database (its URL) by name, on an embedded or given server."""
    if database_url:
        yield lambda name: _create(database_url, name)
        return
    from forgeline.embedded import start_postgres

    data_dir = Path(tempfile.mkdtemp(prefix="fl-bench-", dir="/tmp"))
    data_dir.chmod(0o711)
    pg = start_postgres(data_dir)
    try:
        yield lambda name: _create(pg.url("postgres"), name)
    finally:
        pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _create(server_url: str, name: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(server_url, dbname=name)


def write_events(
    app: Forgeline, events: int, progress: bool = True, per_save: int = REQUESTS_PER_SAVE
) -> tuple[int, float]:
    """Writes about `events` events, `per_save` requests per transaction (two transactions:
    submitted, then the rest of their runs); returns (events written, seconds)."""
    requests = max(1, events // EVENTS_PER_REQUEST)
    written, started = 0, time.perf_counter()
    for first in range(0, requests, per_save):
        created, runs = [], []
        for _ in range(min(per_save, requests - first)):
            request, run = Request.submit(
                request_id=uuid.uuid4(),
                run_id=uuid.uuid4(),
                spec=RequestSpec(repo="/srv/repo", prompt="echo hi"),
                command_id=f"cmd-{uuid.uuid4()}",
            )
            created += [request, run]
            runs.append(run)
        app.save(*created)
        for run in runs:
            run.start_provisioning("bench")
            run.record_workspace("local", "c0ffee" * 6 + "ab")
            run.start()
            run.record_patch(DIFF, STATS)
            run.succeed(0, 1, "f" * 64)
        app.save(*runs)
        written += len(runs) * EVENTS_PER_REQUEST
        if progress and (first // per_save) % 200 == 0:
            rate = written / (time.perf_counter() - started)
            print(f"  wrote {written:,} events ({rate:,.0f}/s)", file=sys.stderr, flush=True)
    return written, time.perf_counter() - started


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def raw_select(url: str) -> int:
    count = 0
    with psycopg.connect(url) as conn, conn.cursor(name="raw") as cur:
        cur.itersize = 5000
        cur.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state"
                " FROM {} ORDER BY notification_id"
            ).format(sql.Identifier(EVENTS_TABLE))
        )
        for _ in cur:
            count += 1
    return count


def notifications(app: Forgeline, batch: int = 2000) -> int:
    count, start = 0, 0
    while chunk := app.recorder.select_notifications(
        start=start, limit=batch, inclusive_of_start=False
    ):
        count += len(chunk)
        start = chunk[-1].id
    return count


def trigger_cost(new_db: Callable[[str], str], events: int, rounds: int = 3) -> dict[str, Any]:
    """The same writes into a store without and with the integrity triggers, both in batches
    (100 requests per save) and one request per save (as the command handler writes). The two
    alternate, `rounds` times each, and the best round of each counts (this machine is shared:
    the best is the least disturbed)."""
    results: dict[str, Any] = {}
    for per_save, count in ((REQUESTS_PER_SAVE, events), (1, max(events // 10, 700))):
        apps: dict[str, Forgeline] = {}
        for label in ("without", "with"):
            url = new_db(f"bench_writes_{per_save}_{label}")
            apps[label] = Forgeline(env=eventsourcing_env(url))
            if label == "with":
                ensure_store_integrity(url)
                apps[label].close()
                apps[label] = Forgeline(env=eventsourcing_env(url))
            write_events(apps[label], count // 10, progress=False, per_save=per_save)  # warm-up
        best: dict[str, dict[str, Any]] = {}
        try:
            for _ in range(rounds):
                for label, app in apps.items():
                    written, seconds = write_events(app, count, progress=False, per_save=per_save)
                    rate = written / seconds
                    if label not in best or rate > best[label]["events_per_s"]:
                        best[label] = {"events": written, "seconds": seconds, "events_per_s": rate}
        finally:
            for app in apps.values():
                app.close()
        off, on = best["without"]["events_per_s"], best["with"]["events_per_s"]
        case: dict[str, Any] = {**best, "overhead_pct": (off / on - 1) * 100}
        results[f"{per_save} requests per save"] = case
        print(
            f"  {per_save:>3} request(s) per save: {off:>8,.0f} events/s without triggers,"
            f" {on:>8,.0f} with (+{case['overhead_pct']:.0f}% time)",
            file=sys.stderr,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay_bench", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--trigger-events", type=int, default=50_000)
    parser.add_argument("--database-url", help="a server to create the bench databases on")
    parser.add_argument("--out", type=Path, help="write the results as JSON into this dir")
    parser.add_argument("--skip-trigger-cost", action="store_true", help="measure only the reads")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"events_requested": args.events}
    with server(args.database_url) as new_db:
        if not args.skip_trigger_cost:
            print("integrity triggers: insert cost", file=sys.stderr)
            results["trigger_cost"] = trigger_cost(new_db, args.trigger_events)

        url = new_db("bench_replay")
        app = open_store(url)
        ensure_store_integrity(url)
        app.close()
        app = open_store(url)
        try:
            print(f"writing {args.events:,} events", file=sys.stderr)
            written, seconds = write_events(app, args.events)
            results["written"] = {"events": written, "events_per_s": written / seconds}
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(EVENTS_TABLE)))
            rows = {}
            for name, fn in (
                ("raw SELECT", lambda: raw_select(url)),
                ("select_notifications", lambda: notifications(app)),
                ("replay (in memory)", lambda: replay(app).events),
                ("rebuild (bulk + swap)", lambda: rebuild_and_swap(app, url).events),
                (
                    "rebuild (SQL per event)",
                    lambda: rebuild_and_swap(app, url, bulk=False).events,
                ),
                ("verify (both chains)", lambda: _verify(url)),
            ):
                print(f"measuring {name}", file=sys.stderr, flush=True)
                count, took = timed(fn)
                assert count == written, (name, count, written)
                rows[name] = {"events": count, "seconds": took, "events_per_s": count / took}
            results["read"] = rows
        finally:
            app.close()

    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    floor = results["read"]["raw SELECT"]["events_per_s"]
    print(f"\n{written:,} stored events")
    print(f"{'case':26} {'events/s':>12} {'seconds':>9} {'vs raw SELECT':>14}")
    for name, row in results["read"].items():
        print(
            f"{name:26} {row['events_per_s']:>12,.0f} {row['seconds']:>9.1f}"
            f" {floor / row['events_per_s']:>13.1f}x"
        )
    print(f"peak memory of this process: {results['peak_rss_mb']:,.0f} MB")
    print("\ninserts without / with the integrity triggers:")
    for name, case in results.get("trigger_cost", {}).items():
        off, on = case["without"]["events_per_s"], case["with"]["events_per_s"]
        print(
            f"  {name:22} {off:>8,.0f} / {on:>8,.0f} events/s"
            f"  (+{case['overhead_pct']:.0f}% time; {case['with']['events']:,} events)"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"python": sys.version.split()[0], "machine": platform.machine()}
        path = args.out / f"replay-{int(time.time())}.json"
        path.write_text(json.dumps({"meta": meta, **results}, indent=2))
        print(f"results written to {path}")
    return 0


def _verify(url: str) -> int:
    with psycopg.connect(url) as conn:
        result = verify(conn)
    assert result.ok, result.first_break
    return result.events


if __name__ == "__main__":
    sys.exit(main())

"""Store-level commands for auditors and operators: audit, replay, verify, projections rebuild.

They read the event store directly (FORGELINE_DATABASE_URL, or the embedded Postgres of
FORGELINE_DATA_DIR: reused when it runs, else started for the command and stopped after), never
the gateway. See docs/audit.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from forgeline.settings import Settings

if TYPE_CHECKING:
    from domain.application import Forgeline

EXIT_OK, EXIT_BROKEN, EXIT_USAGE = 0, 1, 2


class StoreUnavailable(RuntimeError):
    """No store to read; the message says where we looked and what to set."""


class UsageError(ValueError):
    """A flag or argument that cannot be used; the message says why."""


def _out() -> Console:
    # Piped output is never wrapped or cut (ids and digests must survive copy-paste); made per
    # call, so it writes to whatever sys.stdout is then.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "audit", help="the complete history of a request and its runs, from the event store"
    )
    p.add_argument("request_id", help="request id")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _store_flags(p)
    p.set_defaults(handler=_audit)

    p = sub.add_parser(
        "replay", help="every request and run as they stood at a past position or moment"
    )
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--as-of",
        metavar="TIMESTAMP",
        help="ISO 8601 time (UTC unless it has an offset): the state just before the first event "
        "recorded after it",
    )
    when.add_argument("--position", type=int, metavar="N", help="the state after store position N")
    p.add_argument("--request", metavar="ID", help="only this request and its runs")
    p.add_argument(
        "--limit", type=int, default=50, help="requests listed as text, newest first (default 50)"
    )
    p.add_argument("--json", action="store_true", help="print the state as JSON (all of it)")
    _store_flags(p)
    p.set_defaults(handler=_replay)

    p = sub.add_parser("verify", help="check the event store's hash chains; exit 1 on a break")
    p.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="POSITION:HASH",
        help="a head printed by an earlier verify, which must still be in the chain (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _store_flags(p)
    p.set_defaults(handler=_verify)

    p = sub.add_parser("projections", help="the read models kept from the event store")
    actions = p.add_subparsers(dest="projections_action", required=True, metavar="ACTION")
    r = actions.add_parser(
        "rebuild",
        help="rebuild read tables from position 0 and swap them in atomically (the API keeps "
        "serving, the live projector keeps running)",
    )
    r.add_argument("name", nargs="?", help="which projection (default: all): views")
    _store_flags(r)
    r.set_defaults(handler=_rebuild)


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", type=Path, help="the embedded Postgres' data dir (FORGELINE_DATA_DIR)"
    )


# ---------------------------------------------------------------------- reaching the store


@contextlib.contextmanager
def store_database(settings: Settings) -> Iterator[str]:
    """The store's database URL: FORGELINE_DATABASE_URL, or the embedded Postgres of the data
    dir (reused when running; else started now and stopped when the command is done)."""
    if settings.database_url:
        yield settings.database_url
        return
    from forgeline import embedded

    pg_dir = settings.data_dir / "postgres"
    if not (pg_dir / "pgdata" / "PG_VERSION").exists():
        raise StoreUnavailable(
            f"no Forgeline store in {settings.data_dir} (no {pg_dir / 'pgdata'}); set "
            "FORGELINE_DATABASE_URL, or FORGELINE_DATA_DIR / --data-dir to the data dir of "
            "`forgeline up`"
        )
    was_running = _embedded_answers(pg_dir)
    server = embedded.start_postgres(pg_dir)
    try:
        yield server.url("forgeline")
    finally:
        if not was_running:
            server.stop()


def _embedded_answers(pg_dir: Path) -> bool:
    """Whether a Postgres already serves this data dir (then it is someone else's to stop)."""
    import psycopg

    if not (pg_dir / "pgdata" / "postmaster.pid").exists():
        return False
    try:
        with psycopg.connect(
            host=str(pg_dir / "run"), user="postgres", dbname="postgres", connect_timeout=3
        ):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def _opened_store(url: str, settings: Settings) -> Iterator[Forgeline]:
    """The store application, decrypting with FORGELINE_CIPHER_KEY when the store is encrypted."""
    from forgeline.bootstrap import open_store

    app = open_store(url, settings.cipher_key)
    try:
        yield app
    except Exception as exc:
        if _undecodable(exc):
            raise StoreUnavailable(
                f"a stored event cannot be decoded ({exc}). If the store is encrypted, set "
                "FORGELINE_CIPHER_KEY to the key it was written with."
            ) from exc
        raise
    finally:
        app.close()


def _undecodable(exc: BaseException) -> bool:
    """Whether decoding a stored event failed (encrypted without, or with another, key)."""
    from eventsourcing.persistence import MapperDeserialisationError

    return isinstance(exc, MapperDeserialisationError)


def _guarded(run: Any) -> Any:
    def wrapper(args: argparse.Namespace, settings: Settings) -> int:
        from forgeline.embedded import EmbeddedServerError

        try:
            return int(run(args, settings))
        except (StoreUnavailable, EmbeddedServerError, UsageError) as exc:
            _err().print(f"[red]error:[/red] {exc}", markup=True)
            return EXIT_USAGE

    return wrapper


def _uuid(text: str, what: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a UUID") from None


def _time(value: str | None) -> str:
    """An ISO timestamp as people read it: UTC, to the millisecond."""
    if not value:
        return ""
    moment = datetime.fromisoformat(value).astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# -------------------------------------------------------------------------------- audit


@_guarded
def _audit(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from projections.audit import audit_report, load_request_events

    request_id = _uuid(args.request_id, "request id")
    with (
        store_database(settings) as url,
        _opened_store(url, settings) as app,
        psycopg.connect(url) as conn,
    ):
        events = load_request_events(app, conn, request_id)
    if events is None:
        _err().print(f"[red]error:[/red] the store holds no request {request_id}", markup=True)
        return EXIT_BROKEN
    report = audit_report(request_id, events)
    if args.json:
        _json(report)
    else:
        print_audit(report, _out())
    return EXIT_OK


def print_audit(report: dict[str, Any], out: Console) -> None:
    req = report["request"]
    out.print(f"[bold]request {req['id']}[/bold]  {req['status']}", markup=True)
    by = f"by {req['submitted_by']}, " if req.get("submitted_by") else ""
    out.print(f"  submitted  {_time(req['submitted_at'])}  {by}command {req['command_id']}")
    if req["idempotency_key"]:
        out.print(f"  idempotency key  {req['idempotency_key']}")
    out.print(
        f"  repo {req['repo']} @ {req['ref'] or 'HEAD'}  agent {req['agent']}"
        f"  priority {req['priority']}  timeout {req['timeout_s']}s"
    )
    if req["labels"]:
        out.print("  labels " + ", ".join(f"{k}={v}" for k, v in req["labels"].items()))
    if req["agent_options"]:
        out.print(f"  agent options {json.dumps(req['agent_options'], sort_keys=True)}")
    _print_prompt(out, "prompt", req["prompt"])

    runs = Table("#", "run", "status", "attempts", "exit", "error", "patch sha256", "log sha256")
    runs.title, runs.title_justify = "runs", "left"
    for run in report["runs"]:
        attempts = ", ".join(
            f"{a['attempt']}@{a['worker']}" + (f" ({a['outcome']})" if a["outcome"] else "")
            for a in run["attempts"]
        )
        runs.add_row(
            str(run["number"]),
            run["id"],
            run["status"],
            attempts or "-",
            "" if run["exit_code"] is None else str(run["exit_code"]),
            run["error"]["code"] if run["error"] else "",
            run["patch"]["sha256"] if run["patch"] else "",
            run["log"]["sha256"][:12] if run["log"] else "",
        )
    out.print(runs)
    for run in report["runs"]:
        if run["number"] > 1 and run["prompt"] != req["prompt"]:
            _print_prompt(out, f"run #{run['number']} prompt", run["prompt"])

    timeline = Table("position", "time (UTC)", "run", "event", "status", "what")
    timeline.title, timeline.title_justify = "timeline", "left"
    for entry in report["timeline"]:
        before, after = entry["status_from"], entry["status_to"]
        change = f"{before} -> {after}" if before and before != after else (after or "")
        if before == after:
            change = ""
        timeline.add_row(
            str(entry["position"]),
            _time(entry["timestamp"]),
            f"#{entry['run_number']}" if entry["run_number"] else "request",
            entry["type"],
            change,
            entry["summary"],
        )
    out.print(timeline)


def _print_prompt(out: Console, label: str, prompt: str) -> None:
    lines = prompt.splitlines() or [""]
    out.print(f"  {label}  {lines[0]}", markup=False)
    for line in lines[1:]:
        out.print(" " * (len(label) + 4) + line, markup=False)


# ------------------------------------------------------------------------------- replay


def parse_as_of(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--as-of {text!r} is not an ISO 8601 time (e.g. 2025-03-01T09:30:00Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@_guarded
def _replay(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from projections.replay import replay, replay_request

    as_of = parse_as_of(args.as_of) if args.as_of else None
    if args.position is not None and args.position < 0:
        raise UsageError("--position must be 0 or more")
    request_id = _uuid(args.request, "request id") if args.request else None
    with store_database(settings) as url, _opened_store(url, settings) as app:
        if request_id is not None:
            with psycopg.connect(url) as conn:
                state = replay_request(app, conn, request_id, position=args.position, as_of=as_of)
        else:
            state = replay(app, position=args.position, as_of=as_of)
    moment = {
        "position": args.position if args.position is not None else state.position,
        "as_of": as_of.isoformat() if as_of else None,
        "last_event": {
            "position": state.position,
            "timestamp": state.last_timestamp.isoformat() if state.last_timestamp else None,
        },
        "events_applied": state.events,
    }
    if request_id is not None:
        view = state.request_view(request_id)
        if args.json:
            _json({**moment, "request": view})
        else:
            _print_moment(moment, _out())
            if view is None:
                _out().print(f"request {request_id} did not exist yet")
            else:
                _print_request(view, _out())
        return EXIT_OK
    views = state.request_views()
    if args.json:
        _json({**moment, "requests": views})
        return EXIT_OK
    out = _out()
    _print_moment(moment, out)
    table = Table("request", "status", "agent", "created (UTC)", "updated (UTC)", "runs")
    for view in views[: max(args.limit, 0)]:
        table.add_row(
            view["id"],
            view["status"],
            view["agent"],
            _time(view["created_at"]),
            _time(view["updated_at"]),
            ", ".join(f"#{r['number']} {r['status']}" for r in view["runs"]),
        )
    out.print(table)
    more = len(views) - max(args.limit, 0)
    note = f" ({more} older not listed: --limit, --request or --json)" if more > 0 else ""
    out.print(f"{len(views)} request(s), {sum(len(v['runs']) for v in views)} run(s){note}")
    return EXIT_OK


def _print_moment(moment: dict[str, Any], out: Console) -> None:
    text = f"state after position {moment['position']}"
    if moment["as_of"]:
        text = f"state as of {_time(moment['as_of'])}, after position {moment['position']}"
    last = moment["last_event"]
    if last["timestamp"]:
        text += f"; {moment['events_applied']} event(s) applied, the last at position"
        text += f" {last['position']}, {_time(last['timestamp'])}"
    else:
        text += "; no event applied"
    out.print(text)


def _print_request(view: dict[str, Any], out: Console) -> None:
    out.print(f"request {view['id']}  [bold]{view['status']}[/bold]", markup=True)
    out.print(
        f"  repo {view['repo']} @ {view['ref'] or 'HEAD'}  agent {view['agent']}"
        f"  priority {view['priority']}  updated {_time(view['updated_at'])}"
    )
    table = Table("#", "run", "status", "attempt", "exit", "error", "patch")
    for run in view["runs"]:
        patch = run["patch"]
        table.add_row(
            str(run["number"]),
            run["id"],
            run["status"],
            str(run["attempt"]),
            "" if run["exit_code"] is None else str(run["exit_code"]),
            run["error"]["code"] if run["error"] else "",
            f"+{patch['insertions']} -{patch['deletions']} {patch['sha256'][:12]}" if patch else "",
        )
    out.print(table)


# ------------------------------------------------------------------------------- verify


def _parse_anchor(text: str) -> tuple[int, str]:
    position, sep, digest = text.partition(":")
    if not sep or not position.isdigit() or len(digest) != 64:
        raise UsageError(f"--anchor {text!r}: expected POSITION:SHA256HEX, as verify prints it")
    return int(position), digest.lower()


@_guarded
def _verify(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from forgeline.store_integrity import protection_status, verify

    anchors = [_parse_anchor(a) for a in args.anchor]
    with store_database(settings) as url, psycopg.connect(url, autocommit=True) as conn:
        protection = protection_status(conn)
        with _progress(bool(args.json)) as progress:
            task = progress.add_task("verifying", total=_event_count(conn))
            result = verify(conn, anchors=anchors, progress=lambda n: progress.advance(task, n))
    unprotected = {name: state for name, state in protection.items() if state != "enabled"}
    if args.json:
        _json({**result.as_dict(), "triggers": protection})
        return EXIT_OK if result.ok and not unprotected else EXIT_BROKEN
    out = _out()
    if result.first_break is None:
        out.print(
            f"ok: {result.events} events verified ({result.aggregates} aggregates); both hash "
            "chains are intact"
        )
        out.print(f"  head {result.head_position}:{result.head_chain}")
        out.print("  (record the head elsewhere; `verify --anchor` checks it is still there)")
    else:
        b = result.first_break
        where = f"position {b.position}"
        if b.aggregate_id:
            where += f" ({b.aggregate} {b.aggregate_id}, version {b.version})"
        out.print(f"BROKEN at {where}: {b.message}")
        if b.stored or b.recomputed:
            label = f"  {b.column} " if b.column else "  "
            out.print(f"{label}stored     {b.stored or '(none)'}")
            out.print(f"{label}recomputed {b.recomputed}")
        out.print(
            f"  the {result.events} events before it verify (last good position"
            f" {result.head_position})"
        )
    for name, state in unprotected.items():
        out.print(f"WARNING: trigger {name} is {state}: the store is not protected")
    return EXIT_OK if result.ok and not unprotected else EXIT_BROKEN


def _event_count(conn: Any) -> int:
    from psycopg import sql

    from domain.application import EVENTS_TABLE

    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(EVENTS_TABLE))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} events/s" if speed else "", style="progress.data.speed")


def _progress(quiet: bool) -> Progress:
    """A progress bar on stderr (stdout stays clean for pipes)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        console=_err(),
        transient=True,
        disable=quiet,
    )


# ------------------------------------------------------------------------------ rebuild


@_guarded
def _rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from projections.rebuild import PROJECTIONS, RebuildError, count_events, rebuild_and_swap

    names = [args.name] if args.name else list(PROJECTIONS)
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown:
        raise UsageError(f"no projection named {unknown[0]!r} (known: {', '.join(PROJECTIONS)})")
    out = _out()
    with store_database(settings) as url, _opened_store(url, settings) as app:
        for name in names:
            total = count_events(url)
            with _progress(False) as progress:
                task = progress.add_task(f"rebuilding {name}", total=total)

                def advance(n: int, task: Any = task, progress: Progress = progress) -> None:
                    progress.advance(task, n)
                    done = progress.tasks[0].completed
                    if done > (progress.tasks[0].total or 0):
                        progress.update(task, total=done)

                started = time.perf_counter()
                try:
                    result = rebuild_and_swap(app, url, name, progress=advance)
                except RebuildError as exc:
                    _err().print(f"[red]error:[/red] {exc}", markup=True)
                    return EXIT_BROKEN
            seconds = time.perf_counter() - started
            rate = result.events / seconds if seconds > 0 else 0.0
            out.print(
                f"rebuilt {name}: {result.events} events in {seconds:.1f} s ({rate:,.0f} events/s);"
                f" swapped in at position {result.position}"
                f" (the swap held the locks {result.swap_seconds * 1000:.0f} ms)"
            )
    return EXIT_OK

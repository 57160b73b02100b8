"""What every case shares: the servers, Forgeline processes, statistics and result rows.

One embedded Postgres serves the whole run (a fresh database per case); each case gets its own
nats-server (the relay's position lives in JetStream, so a fresh database needs fresh streams).
Forgeline runs in child processes started by `python -m bench.serve` (the same composition
root as `forgeline up`, with the roles a case needs), so the load generator and the probes of
this process never share a GIL with what they measure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from forgeline import embedded

REPO_ROOT = Path(__file__).resolve().parent.parent
NOOP_SCRIPT = "echo benchmark >> README.md\n"
# A key long enough for FORGELINE_ADMIN_KEY: every bench process starts on a fresh database, so
# it is each gateway's first start and the key becomes its first admin key. Gateways without
# authentication ignore the header.
ADMIN_KEY = "fl_bench_" + secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of every child process: the repo on sys.path, quiet, no rate limit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGELINE_")}
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT),
            "FORGELINE_ADMIN_KEY": ADMIN_KEY,
            # The per-key rate limit (1,200 a minute by default) would answer 429 to a load
            # test: off, as an operator would set it for a trusted client.
            "FORGELINE_RATE_LIMIT_PER_MIN": "0",
            "FORGELINE_LOG_LEVEL": "WARNING",
        }
    )
    env.update(extra)
    return env


# ------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Config:
    """The sizes of every case: a full run, or --quick (the CI smoke: tiny, no thresholds)."""

    quick: bool = False
    rounds: int = 30  # sequential end-to-end requests per provisioner (case 4, 6)
    warmup: int = 3  # end-to-end requests before those (not measured)
    trials: int = 3  # repetitions of each throughput measurement
    slots: int = 4  # FORGELINE_WORKER_SLOTS, and the Celery worker's concurrency
    docker: bool = True
    # 1 ingest: fixed-rate window, then closed-loop max throughput
    ingest_rate: float = 200.0
    ingest_seconds: float = 10.0
    ingest_concurrency: int = 32
    ingest_count: int = 4000
    ingest_max_seconds: float = 10.0
    # 2 command -> committed events
    store_rate: float = 50.0  # below the handler's capacity (~110 commands/s here)
    store_latency_count: int = 500
    store_backlog: int = 5000
    store_batch: int = 100  # requests per save(*aggs) in the floor
    # 3 projection lag
    lag_rate: float = 200.0
    lag_seconds: float = 10.0
    # 5 drain
    drain_n: int = 1000
    # 7 scale
    scale_small: int = 1000
    scale_big: int = 100_000
    scale_samples: int = 200

    @classmethod
    def make(cls, *, quick: bool, rounds: int | None, trials: int | None, **kw: Any) -> Config:
        if quick:
            base = cls(
                quick=True,
                rounds=2,
                warmup=1,
                trials=1,
                ingest_rate=50.0,
                ingest_seconds=1.0,
                ingest_concurrency=16,
                ingest_count=200,
                ingest_max_seconds=2.0,
                store_rate=20.0,
                store_latency_count=30,
                store_backlog=300,  # a few pull batches of the command handler
                lag_rate=50.0,
                lag_seconds=1.5,
                drain_n=20,
                scale_small=100,
                scale_big=1000,
                scale_samples=20,
            )
        else:
            base = cls()
        changes: dict[str, Any] = dict(kw)
        if rounds is not None:
            changes["rounds"] = rounds
        if trials is not None:
            changes["trials"] = trials
        return replace(base, **changes)


# ------------------------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of samples."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Milliseconds: median, p90, p99, min, max, n."""
    if not seconds:
        return {"n": 0}
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50": statistics.median(ms),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "min": min(ms),
        "max": max(ms),
    }


@dataclass
class Row:
    """One line of the table: Forgeline's number against its floor's, measured in one run.

    kind "latency" (ms, lower is better: p50 and p99 of all samples) or "rate" (per second,
    higher is better: the median over trials and the worst trial).
    """

    case: str
    metric: str
    kind: str  # "latency" | "rate"
    unit: str
    value: dict[str, float]
    floor_name: str
    floor: dict[str, float] | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """How many times slower than the floor (>1 = slower), by the medians."""
        if not self.floor or "p50" not in self.floor or "p50" not in self.value:
            return None
        mine, floor = self.value["p50"], self.floor["p50"]
        if self.kind == "latency":
            return mine / floor if floor > 0 else None
        return floor / mine if mine > 0 else None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["slower_than_floor_x"] = self.ratio
        return data


def rate_summary(per_second: Sequence[float]) -> dict[str, float]:
    """Rates over trials: median (p50) and the worst trial (p99 column), n trials."""
    if not per_second:
        return {"n": 0}
    return {
        "n": len(per_second),
        "p50": statistics.median(per_second),
        "p99": min(per_second),
        "min": min(per_second),
        "max": max(per_second),
    }


# ------------------------------------------------------------------------------- servers


class Stack:
    """A temp dir, one embedded Postgres, databases and nats-servers made on demand."""

    def __init__(self, keep: bool = False, worker_processes: int = 0) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="fl-bench-", dir="/tmp"))
        self.workdir.chmod(0o711)  # as root, Postgres runs as another user that must reach it
        self._keep = keep
        self.worker_processes = worker_processes  # of every Forgeline; 0: worker_processes_for
        self._stops: list[Any] = []
        self._shared: dict[Any, tuple[Forgeline, str]] = {}
        self._case_nats: list[embedded.EmbeddedNats] = []
        self._nats_dirs: dict[str, Path] = {}
        # --quick: cases 4 (local) and 5 share one Forgeline process, to save a start-up.
        # A full run gives each its own, stopped before its by-hand floor is measured.
        self.share_processes = False
        self.pg = embedded.start_postgres(self.workdir / "pg", dbname="bench")
        self._stops.append(self.pg.stop)

    def database(self, name: str) -> str:
        """A fresh, empty database (dropped first if it exists); returns its URL."""
        with psycopg.connect(self.pg.url("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.pg.url(name)

    def nats(self, name: str) -> str:
        server = embedded.start_nats(self.workdir / "nats" / name)
        self._stops.append(server.stop)
        self._case_nats.append(server)
        self._nats_dirs[server.url] = self.workdir / "nats" / name
        return server.url

    def nats_pid(self, url: str) -> int:
        return int((self._nats_dirs[url] / "nats.pid").read_text().split()[0])

    def postgres_pid(self) -> int:
        return int((self.pg.pgdata / "postmaster.pid").read_text().splitlines()[0])

    def end_case(self) -> None:
        """Stops the case's nats-servers (idle ones still tick), not the shared processes'."""
        keep = {fl.nats_url for fl, _ in self._shared.values()}
        for server in self._case_nats:
            if server.url not in keep:
                with contextlib.suppress(Exception):
                    server.stop()
        self._case_nats = [s for s in self._case_nats if s.url in keep]

    def local_forgeline(self, slots: int) -> tuple[Forgeline, str] | None:
        """The shared Forgeline (every role, local workspaces) and its database, or None."""
        if not self.share_processes:
            return None
        key = ("local", slots)
        if key not in self._shared:
            nats_url, database_url = self.nats("local"), self.database("local")
            fl = Forgeline(
                self, nats_url=nats_url, database_url=database_url, slots=slots, name="local"
            )
            self._stops.append(fl.stop)
            self._shared[key] = (fl, database_url)
        return self._shared[key]

    def dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def close(self) -> None:
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()
        self._stops.clear()
        if not self._keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def stack(keep: bool = False, worker_processes: int = 0) -> Iterator[Stack]:
    s = Stack(keep, worker_processes)
    try:
        yield s
    finally:
        s.close()


def make_repo(path: Path) -> Path:
    """A one-commit git repository: the no-op request's target."""
    path.mkdir(parents=True)
    (path / "README.md").write_text("# bench\n")
    git = ["git", "-C", str(path), "-c", "user.name=b", "-c", "user.email=b@example.com"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    path.chmod(0o755)
    return path


# ------------------------------------------------------------------------------ processes


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process, its reaped children and live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile: its parent's cutime has it once it is reaped
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total / tick


class Child:
    """A child process with its output in a log file; stop() is SIGTERM, then SIGKILL."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_dir: Path,
        *,
        ready_line: bool = True,
    ) -> None:
        """ready_line: stdout is a pipe for wait_ready(); else it goes to the log too."""
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready_line else self._log,
            stderr=self._log,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, timeout: float) -> int:
        """Waits for the `READY <port>` line the bench's servers print; returns the port."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if not readable:
                if self.proc.poll() is not None:
                    break
                continue
            line = self.proc.stdout.readline().decode().strip()
            if line.startswith("READY"):
                return int(line.split()[1])
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def worker_processes_for(slots: int) -> int:
    """One worker process per core, at most one per slot: a worker machine as
    docs/operations.md says to run one (FORGELINE_WORKER_PROCESSES). The cases that run
    requests end to end (4, 5, 6) use it; cases 2 and 3 measure one process against a floor
    in one process."""
    return max(1, min(os.cpu_count() or 1, slots))


class Forgeline(Child):
    """Forgeline's roles in one process (`python -m bench.serve`), on the stack's servers."""

    def __init__(
        self,
        stack: Stack,
        *,
        nats_url: str,
        database_url: str,
        roles: Sequence[str] = ("gateway", "worker", "relay", "projector"),
        provisioner: str = "local",
        slots: int = 4,
        name: str = "forgeline",
        worker_processes: int | None = None,
    ) -> None:
        self._profiler: subprocess.Popen[bytes] | None = None
        self.nats_url = nats_url
        data_dir = stack.dir(f"data-{name}-{uuid.uuid4().hex[:6]}")
        env = bench_env(
            FORGELINE_NATS_URL=nats_url,
            FORGELINE_DATABASE_URL=database_url,
            FORGELINE_DATA_DIR=str(data_dir),
            FORGELINE_PORT="0",
            FORGELINE_PROVISIONER=provisioner,
            FORGELINE_WORKER_SLOTS=str(slots),
            FORGELINE_WORKER_PROCESSES=str(
                min(
                    slots, worker_processes or stack.worker_processes or worker_processes_for(slots)
                )
            ),
            FORGELINE_WORKER_NAME=f"bench-{name}",
        )
        super().__init__(
            name,
            [sys.executable, "-m", "bench.serve", "--roles", ",".join(roles)],
            env,
            stack.dir("logs"),
        )
        self.port = self.wait_ready(timeout=600 if provisioner == "docker" else 120)
        self.url = f"http://127.0.0.1:{self.port}"
        self._profiler = profile(self.pid, name)

    def stop(self, timeout: float = 30) -> None:
        super().stop(timeout)
        if self._profiler is not None:
            try:
                self._profiler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._profiler.kill()
                self._profiler.wait()


PROFILE_DIR_ENV = "BENCH_PROFILE_DIR"


def profile(pid: int, name: str) -> subprocess.Popen[bytes] | None:
    """With BENCH_PROFILE_DIR set (python -m bench --profile): py-spy samples the process
    until it exits, as collapsed stacks (<name>.txt, open with speedscope or flamegraph.pl)."""
    out_dir = os.environ.get(PROFILE_DIR_ENV)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not out_dir or not Path(pyspy).exists():
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [pyspy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
         "--output", str(Path(out_dir) / f"{name}.txt"), "--nonblocking", "--threads"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_http(url: str, timeout: float = 60, path: str = "/healthz") -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}{path} did not answer 200 within {timeout} s")
        time.sleep(0.05)


def submit_body(repo: Path, script: str = NOOP_SCRIPT) -> dict[str, Any]:
    return {"repo": str(repo), "prompt": script}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)

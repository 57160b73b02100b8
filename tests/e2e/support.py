"""What the end-to-end tests share: a `forgeline up` child process, git repos, API helpers.

The tests use Forgeline as a user would: the `forgeline` console script, HTTP, and git. The only
peek behind the API is counting rows of the event store through the embedded Postgres socket,
to prove that refused input records nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg

from tests.helpers import free_port, wait_until

TERMINAL_REQUEST = {"patch_ready", "failed", "cancelled"}
TERMINAL_RUN = {"succeeded", "failed", "cancelled"}
PROVISIONER = "local"
# Every `forgeline up` of the tests gets this admin key through FORGELINE_ADMIN_KEY (fresh for
# each test session), and the tests' HTTP clients and CLI runs send it.
ADMIN_KEY = "fl_e2e_" + secrets.token_urlsafe(32)


def auth(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def forgeline_executable() -> str:
    """The console script of the venv running the tests."""
    candidate = Path(sys.executable).with_name("forgeline")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("forgeline")
    assert found, "the `forgeline` console script is not installed"
    return found


def clean_env(**forgeline: str) -> dict[str, str]:
    """The environment without any FORGELINE_* of the machine, plus the given ones.

    Dropping FORGELINE_NATS_URL and FORGELINE_DATABASE_URL makes `forgeline up` start its
    embedded servers instead of reaching the machine's services on 4222 and 5432.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGELINE_")}
    env.update({f"FORGELINE_{key.upper()}": value for key, value in forgeline.items()})
    return env


def short_tmp_dir(prefix: str = "fle2e-") -> Path:
    """Unix socket paths must stay short: the embedded Postgres socket lives under this dir."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Instance:
    """One `forgeline up` child process on a data dir and a port.

    admin_key is passed as FORGELINE_ADMIN_KEY (None: unset, so the first start prints a key);
    env holds more FORGELINE_* settings (lower-case names without the prefix).
    """

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        admin_key: str | None = ADMIN_KEY,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.admin_key = admin_key
        self.extra_env = dict(env or {})
        self.data_dir = root / "data"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.root / f"forgeline-{self.starts}.log"

    def env(self) -> dict[str, str]:
        settings = {
            "data_dir": str(self.data_dir),
            "host": "127.0.0.1",
            "port": str(self.port),
            "log_level": "INFO",
            # Local workspaces: fast and the same on every machine (Docker workspaces need an
            # engine and an image; their own tests cover them).
            "provisioner": PROVISIONER,
            # The tests poll fast (every 10-50 ms); the limit has its own tests.
            "rate_limit_per_min": "60000",
            "rate_limit_burst": "1000",
        }
        if self.admin_key is not None:
            settings["admin_key"] = self.admin_key
        settings.update(self.extra_env)
        return clean_env(**settings)

    def client(self, key: str | None = None, timeout: float = 30.0) -> httpx.Client:
        """An HTTP client of this instance sending key (default: its admin key)."""
        key = key or self.admin_key
        headers = auth(key) if key else {}
        return httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def start(self, ready_timeout: float = 60.0) -> None:
        assert self.proc is None, "already running"
        self.starts += 1
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                forgeline_executable(),
                "up",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
            ],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"forgeline up exited with {self.proc.returncode} before it was ready:\n"
                        f"{self.log_tail()}"
                    )
                try:
                    # Ready, and the banner (printed just after the gateway listens) is out.
                    if (
                        client.get("/readyz").status_code == 200
                        and b"Press Ctrl-C to stop." in self.log_path.read_bytes()
                    ):
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(
                        f"GET /readyz not 200 within {timeout} s:\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a service manager would; returns the exit code (killed if it hangs)."""
        proc = self._running()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"forgeline up still running {timeout} s after SIGTERM:\n{self.log_tail()}"
            ) from None
        self._closed()
        return code

    def kill(self) -> None:
        """kill -9 of the whole process group (forgeline and the nats-server it started)."""
        proc = self._running()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        self._closed()

    def group_alive(self, pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def _running(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None, "not running"
        return self.proc

    def _closed(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def cleanup(self) -> None:
        """Ends whatever is still running (after a failure) and removes the dir."""
        if self.proc is not None:
            self.kill()
        stop_leftover_postgres(self.data_dir)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the store, through the embedded Postgres socket ------------------------------------

    def pg_conninfo(self) -> str:
        return f"host={self.data_dir / 'postgres' / 'run'} port=5432 dbname=forgeline user=postgres"

    def event_count(self) -> int:
        with psycopg.connect(self.pg_conninfo(), connect_timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM forgeline_events").fetchone()
        assert row is not None
        return int(row[0])


def stop_leftover_postgres(data_dir: Path) -> None:
    """The embedded Postgres detaches from its parent's process group; stop it if it is left."""
    pid_file = data_dir / "postgres" / "pgdata" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGINT)  # fast shutdown
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


# -- git ------------------------------------------------------------------------------------


def git(cwd: Path, *args: str, input: bytes | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, check=False)
    assert result.returncode == 0, (
        f"git {' '.join(args)} failed ({result.returncode}): {result.stderr.decode()}"
    )
    return result.stdout.decode()


def make_repo(path: Path, files: Mapping[str, str]) -> Path:
    """A git repository with one commit holding files."""
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    git(path, "config", "user.name", "Forgeline E2E")
    git(path, "config", "user.email", "e2e@forgeline.invalid")
    git(path, "config", "commit.gpgsign", "false")
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", ".")
    git(path, "commit", "--quiet", "-m", "initial")
    return path


def apply_to_clone(repo: Path, patch: str, dest: Path) -> Path:
    """A clean clone of repo with the patch `git apply`-ed (fails the test if it does not apply)."""
    subprocess.run(["git", "clone", "--quiet", str(repo), str(dest)], check=True)
    git(dest, "apply", "--index", "-", input=patch.encode())
    return dest


def tree_files(root: Path) -> dict[str, str]:
    """The files of a work tree (without .git), as relative path -> text."""
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


# -- the API --------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int | set[int]) -> dict[str, Any]:
    """The error format of the contract; returns the error object."""
    allowed = {status} if isinstance(status, int) else status
    assert response.status_code in allowed, (
        f"{response.request.method} {response.request.url.path}: expected {allowed}, got "
        f"{response.status_code}: {response.text[:500]}"
    )
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], list), error
    return dict(error)


def submit(api: httpx.Client, repo: Path | str, prompt: str, **fields: Any) -> dict[str, Any]:
    response = api.post("/v1/requests", json={"repo": str(repo), "prompt": prompt, **fields})
    assert response.status_code == 202, response.text
    return dict(response.json())


def get_request(api: httpx.Client, request_id: str) -> dict[str, Any] | None:
    """The request, or None while it is accepted but not projected yet (404)."""
    response = api.get(f"/v1/requests/{request_id}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_request(
    api: httpx.Client,
    request_id: str,
    statuses: set[str] = TERMINAL_REQUEST,
    timeout: float = 30.0,
    interval: float = 0.05,
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        view = get_request(api, request_id)
        return view if view is not None and view["status"] in statuses else None

    message = f"request {request_id} to be {sorted(statuses)}"
    result = wait_until(reached, timeout, message, interval=interval)
    assert isinstance(result, dict)
    return result


def wait_run(
    api: httpx.Client, run_id: str, statuses: set[str] = TERMINAL_RUN, timeout: float = 30.0
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        response = api.get(f"/v1/runs/{run_id}")
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        view = response.json()
        return view if view["status"] in statuses else None

    result = wait_until(reached, timeout, f"run {run_id} to be {sorted(statuses)}")
    assert isinstance(result, dict)
    return result


def sse(
    api: httpx.Client, run_id: str, *, follow: bool = True, timeout: float = 30.0
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a run's log stream; the caller stops reading when it likes."""
    params = {"follow": "1" if follow else "0"}
    with api.stream("GET", f"/v1/runs/{run_id}/logs", params=params, timeout=timeout) as response:
        assert response.status_code == 200, response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        event, data = "message", ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data += line[len("data:") :].strip()
            elif not line and data:
                yield event, json.loads(data)
                event, data = "message", ""


def read_logs(
    api: httpx.Client, run_id: str, *, follow: bool = True, timeout: float = 30.0
) -> list[tuple[str, dict[str, Any]]]:
    """The whole log stream of a run, once its run is visible (it may 404 for a moment)."""
    wait_until(
        lambda: api.get(f"/v1/runs/{run_id}").status_code == 200,
        timeout,
        f"run {run_id} to be visible",
    )
    return list(sse(api, run_id, follow=follow, timeout=timeout))


def events(api: httpx.Client, request_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/v1/requests/{request_id}/events")
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def all_requests(api: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    """Every listed request, following next_cursor."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        query = {"limit": 200, **params} | ({"cursor": cursor} if cursor else {})
        response = api.get("/v1/requests", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the request list never ended")

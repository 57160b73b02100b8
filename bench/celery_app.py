"""The alternative users would pick: Celery + Redis + Postgres, doing the same no-op request.

The task Celery runs for each request: mark it running, clone the repository, run the prompt
as a bash script in the clone (with a timeout, stdout and stderr captured), `git add -A && git
diff --cached --binary <base>`, store the patch and the status in the `alt_requests` table,
remove the clone. Configured the way the Celery docs advise for long jobs: late acks (a task
is acknowledged after it ran, so a killed worker's task is redelivered) and a prefetch of 1.

Broker: BENCH_REDIS_URL; table: BENCH_ALT_DATABASE_URL; clones under BENCH_ALT_WORKDIR.
Run by `celery -A bench.celery_app worker --concurrency S` (bench/alternative.py starts it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
from celery import Celery

app = Celery("forgeline_alternative", broker=os.environ.get("BENCH_REDIS_URL", "redis://"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_serializer="json",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS alt_requests (
    id uuid PRIMARY KEY,
    repo text NOT NULL,
    ref text,
    prompt text NOT NULL,
    status text NOT NULL,
    exit_code int,
    error text,
    patch text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""

_conn: psycopg.Connection[tuple[object, ...]] | None = None


def _db() -> psycopg.Connection[tuple[object, ...]]:
    global _conn
    if _conn is None or _conn.closed:
        _conn = psycopg.connect(os.environ["BENCH_ALT_DATABASE_URL"], autocommit=True)
    return _conn


def _git(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, check=True)


@app.task(name="alt.process_request")  # type: ignore[untyped-decorator]
def process_request(request_id: str) -> None:
    db = _db()
    row = db.execute(
        "UPDATE alt_requests SET status = 'running', started_at = clock_timestamp(),"
        " updated_at = clock_timestamp() WHERE id = %s"
        " RETURNING repo, ref, prompt",
        (request_id,),
    ).fetchone()
    if row is None:
        return
    repo, ref, prompt = str(row[0]), row[1], str(row[2])
    work = Path(tempfile.mkdtemp(prefix="alt-", dir=os.environ.get("BENCH_ALT_WORKDIR")))
    try:
        clone = work / "repo"
        try:
            _git("clone", "--quiet", "--no-checkout", repo, str(clone))
            base = _git("rev-parse", f"{ref or 'HEAD'}^{{commit}}", cwd=clone).stdout.strip()
            _git("checkout", "--quiet", "--detach", base.decode(), cwd=clone)
        except subprocess.CalledProcessError as exc:
            db.execute(
                "UPDATE alt_requests SET status = 'failed', error = %s,"
                " updated_at = clock_timestamp() WHERE id = %s",
                (exc.stderr.decode(errors="replace")[-500:], request_id),
            )
            return
        script = work / "prompt.sh"
        script.write_text(prompt)
        try:
            agent = subprocess.run(
                ["bash", str(script)], cwd=clone, capture_output=True, timeout=3600, check=False
            )
            code = agent.returncode
        except subprocess.TimeoutExpired:
            code = -1
        _git("add", "-A", cwd=clone)
        diff = _git("diff", "--cached", "--binary", base.decode(), cwd=clone).stdout
        db.execute(
            "UPDATE alt_requests SET status = %s, exit_code = %s, patch = %s,"
            " updated_at = clock_timestamp() WHERE id = %s",
            (
                "patch_ready" if code == 0 else "failed",
                code,
                diff.decode(errors="replace"),
                request_id,
            ),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

"""The `forgeline` client commands against a `forgeline up`, and the self-contained demo."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.support import (
    ADMIN_KEY,
    PROVISIONER,
    Instance,
    apply_to_clone,
    clean_env,
    forgeline_executable,
    make_repo,
    tree_files,
    wait_request,
    wait_run,
)
from tests.helpers import free_port, wait_until

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ORIGINAL = {"README.md": "# cli\n", "src/app.py": "print('v1')\n"}
SCRIPT = """\
echo "hello from the script"
echo "a note on stderr" >&2
printf "print('v2')\\n" > src/app.py
printf 'new\\n' > added.txt
"""


def run_cli(
    url: str, *args: str, timeout: float = 60, columns: int | None = 200
) -> subprocess.CompletedProcess[str]:
    env = clean_env(url=url, api_key=ADMIN_KEY)
    if columns is not None:
        env["COLUMNS"] = str(columns)  # a wide terminal; the default width is tested apart
    else:
        env.pop("COLUMNS", None)
    return subprocess.run(
        [forgeline_executable(), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def failed(result: subprocess.CompletedProcess[str]) -> str:
    """A non-zero exit with a one-line readable message, no traceback; returns stderr."""
    assert result.returncode != 0, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.stderr.strip(), "the error is explained on stderr"
    return result.stderr


def ids_of(output: str) -> list[str]:
    return re.findall(UUID, output)


@pytest.fixture(scope="module")
def url(forgeline: Instance) -> str:
    return forgeline.url


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo", ORIGINAL)


def test_submit_wait_status_logs_patch_rerun(
    url: str, api: httpx.Client, repo: Path, tmp_path: Path
) -> None:
    out = ok(run_cli(url, "submit", str(repo), "--prompt", SCRIPT, "--wait"))
    request_id, run_id = ids_of(out)[:2]
    assert "hello from the script" in out
    assert "patch_ready" in out
    assert f"forgeline patch {run_id}" in out

    out = ok(run_cli(url, "status", request_id))
    assert request_id in out and "patch_ready" in out
    assert run_id in out and "succeeded" in out

    listing = ok(run_cli(url, "status"))
    assert request_id in listing

    result = run_cli(url, "logs", run_id)
    out = ok(result)
    assert out.splitlines().count("hello from the script") == 1
    assert "a note on stderr" in result.stderr and "a note on stderr" not in out
    assert "succeeded" in result.stderr

    # forgeline patch RUN_ID | git apply, in a clean clone
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
    piped = subprocess.run(
        f"{forgeline_executable()} patch {run_id} | git apply -",
        shell=True,
        cwd=clone,
        env=clean_env(url=url, api_key=ADMIN_KEY),
        capture_output=True,
        text=True,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert tree_files(clone) == {**ORIGINAL, "src/app.py": "print('v2')\n", "added.txt": "new\n"}

    out = ok(run_cli(url, "rerun", request_id, "--prompt", "printf 'more\\n' > more.txt", "--wait"))
    assert "patch_ready" in out
    rerun_id = next(i for i in ids_of(out) if i not in (request_id, run_id))
    view = wait_request(api, request_id)
    assert view["latest_run_id"] == rerun_id and len(view["runs"]) == 2
    patch = ok(run_cli(url, "patch", rerun_id))
    clone = apply_to_clone(repo, patch, tmp_path / "clone2")
    assert tree_files(clone)["more.txt"] == "more\n"
    assert tree_files(clone)["added.txt"] == "new\n", "the rerun's patch is cumulative"


def test_submit_wait_of_a_failing_script_exits_non_zero(url: str, repo: Path) -> None:
    result = run_cli(url, "submit", str(repo), "--prompt", "echo 'giving up'\nexit 4", "--wait")
    assert result.returncode != 0
    assert "giving up" in result.stdout and "failed" in result.stdout
    run_id = ids_of(result.stdout)[1]
    err = failed(run_cli(url, "patch", run_id))
    assert "no patch" in err, err


def test_submit_without_wait_then_follow_the_logs(url: str, api: httpx.Client, repo: Path) -> None:
    out = ok(run_cli(url, "submit", str(repo), "--prompt", "echo first\nsleep 1\necho last\n"))
    request_id, run_id = ids_of(out)[:2]
    wait_run(api, run_id, {"provisioning", "running", "succeeded"})
    result = run_cli(url, "logs", run_id, "-f")
    lines = ok(result).splitlines()
    assert lines.index("first") < lines.index("last")
    assert "succeeded" in result.stderr
    assert wait_request(api, request_id)["status"] == "patch_ready"


def test_cancel(url: str, api: httpx.Client, repo: Path) -> None:
    marker = f"60.{uuid.uuid4().int % 10**6:06d}"
    out = ok(run_cli(url, "submit", str(repo), "--prompt", f"echo napping\nsleep {marker}\n"))
    request_id, run_id = ids_of(out)[:2]
    wait_run(api, run_id, {"running"})

    out = ok(run_cli(url, "cancel", request_id))
    assert run_id in out and request_id in out
    assert wait_run(api, run_id, timeout=5)["status"] == "cancelled"
    assert "cancelled" in ok(run_cli(url, "status", request_id))

    err = failed(run_cli(url, "cancel", request_id))
    assert "nothing to cancel" in err


@pytest.mark.parametrize(
    ("command", "what"),
    [
        ("status", "request"),
        ("cancel", "request"),
        ("logs", "run"),
        ("patch", "run"),
    ],
)
def test_unknown_ids_exit_non_zero_with_a_readable_message(
    url: str, command: str, what: str
) -> None:
    ident = "not-an-id" if command == "status" else str(uuid.uuid4())
    err = failed(run_cli(url, command, ident))
    assert f"no {what} with id {ident}" in err, err


def test_bad_input_is_explained(url: str, repo: Path) -> None:
    err = failed(run_cli(url, "submit", "relative/path", "--prompt", "echo hi"))
    assert "repo" in err, err
    err = failed(run_cli(url, "submit", str(repo), "--prompt", "echo hi", "--priority", "9"))
    assert "priority" in err, err
    err = failed(run_cli(url, "submit", str(repo), "--prompt", "echo hi", "--budget-usd", "0"))
    assert "budget_usd" in err, err
    err = failed(run_cli(url, "submit", str(repo), "--prompt", "echo hi", "--max-tokens", "-5"))
    assert "max_tokens" in err, err


def test_an_unreachable_gateway_is_explained() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    err = failed(run_cli(url, "status"))
    assert "cannot reach the gateway" in err and url in err, err


def test_ids_are_printed_whole_without_a_wide_terminal(url: str, repo: Path) -> None:
    out = ok(run_cli(url, "submit", str(repo), "--prompt", "echo x > x.txt", columns=None))
    first_line = out.splitlines()[0]
    assert len(ids_of(first_line)) == 2, out
    request_id = ids_of(first_line)[0]
    listing = ok(run_cli(url, "status", columns=None))
    assert request_id in listing, listing


def test_demo_runs_by_itself_and_exits_0() -> None:
    env = clean_env(provisioner=PROVISIONER)
    env["COLUMNS"] = "120"
    result = subprocess.run(
        [forgeline_executable(), "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "FAILED" not in output
    assert output.count(" ok ") >= 4 or output.count("ok  ") >= 4, output
    assert "patch_ready" in output and "diff --git" in output
    # An LLM agent's run against the built-in fake model, through the proxy, labelled so.
    assert "fake model (built-in, scripted)" in output
    assert "ok  LLM agent (fake model (built-in, scripted)) succeeded with a patch" in output
    assert "ok  the capped LLM run ended budget_exceeded" in output
    assert "3170 tokens in, 150 out" in output, output
    # It cleans up after itself: its temp dir and its servers are gone.
    match = re.search(r"sample repository: (/tmp/fl-demo-[^/\s]+)/", output)
    assert match, output
    workdir = Path(match.group(1))
    wait_until(lambda: not workdir.exists(), 5, f"{workdir} to be removed")
    assert not _processes_mentioning(str(workdir)), "the demo left servers running"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids

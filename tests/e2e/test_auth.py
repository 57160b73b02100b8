"""API keys as a user meets them: the first start's key, FORGELINE_ADMIN_KEY, `forgeline keys`,
and the CLI with and without FORGELINE_API_KEY."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import stop_cleanly
from tests.e2e.support import (
    ADMIN_KEY,
    Instance,
    assert_error,
    clean_env,
    forgeline_executable,
    make_repo,
    short_tmp_dir,
    submit,
    wait_request,
)

SECRET = re.compile(r"fl_[A-Za-z0-9_-]{40,}")


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [forgeline_executable(), *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def fresh() -> Iterator[Instance]:
    """A `forgeline up` without FORGELINE_ADMIN_KEY, not started yet."""
    instance = Instance(short_tmp_dir(), admin_key=None)
    try:
        yield instance
    finally:
        instance.cleanup()


def test_the_first_start_prints_an_admin_key_once_and_never_again(
    fresh: Instance, tmp_path: Path
) -> None:
    fresh.start()
    first_log = fresh.log_path.read_text()
    printed = SECRET.findall(first_log)
    assert len(printed) == 1, first_log
    key = printed[0]
    banner = [line for line in first_log.splitlines() if key in line]
    assert banner == [f"  admin key  {key}"], banner  # the banner only, never a log line
    with fresh.client(key) as api:
        who = api.get("/v1/whoami").json()
        assert who["role"] == "admin" and who["name"] == "first admin key"
    with fresh.client("fl_" + "z" * 43) as stranger:
        assert_error(stranger.get("/v1/requests"), 401)
    stop_cleanly(fresh)

    fresh.start()  # same data dir: a key exists, none is made or shown
    second_log = fresh.log_path.read_text()
    assert not SECRET.findall(second_log), second_log
    assert "admin key  fl_" not in second_log
    with fresh.client(key) as api:
        assert api.get("/v1/whoami").json()["id"] == who["id"]

    # `forgeline keys` works on the store of the running instance, without any API key.
    store = {"data_dir": str(fresh.data_dir)}
    created = cli("keys", "create", "--role", "operator", "--project", "web", **store)
    assert created.returncode == 0, created.stderr
    operator = created.stdout.strip()
    assert SECRET.fullmatch(operator), created.stdout
    assert operator not in created.stderr and "shown this once" in created.stderr

    listed = cli("keys", "list", "--json", **store)
    assert listed.returncode == 0, listed.stderr
    assert operator not in listed.stdout and key not in listed.stdout
    assert '"first admin key"' in listed.stdout and '"operator"' in listed.stdout
    operator_id = re.findall(r'"id": "(key_[0-9a-f]+)"', listed.stdout)[-1]

    repo = make_repo(tmp_path / "repo", {"README.md": "# auth\n"})
    with fresh.client(operator) as api:
        accepted = submit(api, repo, "echo hi > hi.txt", labels={"project": "web"})
        assert wait_request(api, accepted["request_id"])["status"] == "patch_ready"
        assert_error(api.post("/v1/requests", json={"repo": str(repo), "prompt": "true"}), 403)

    # The CLI's client commands send FORGELINE_API_KEY.
    status = cli("status", accepted["request_id"], url=fresh.url, api_key=operator)
    assert status.returncode == 0 and "patch_ready" in status.stdout, status.stderr
    table = cli("keys", "list", **store)
    assert operator_id in table.stdout and "web" in table.stdout

    revoked = cli("keys", "revoke", operator_id, **store)
    assert revoked.returncode == 0 and f"revoked {operator_id}" in revoked.stdout, revoked
    with fresh.client(operator) as api:
        # Revoked by another process: the gateway may hold the key as valid for up to
        # FORGELINE_API_KEY_CACHE_S (2 s; gateway/verified_keys.py). The margin is for load.
        deadline = time.monotonic() + 15
        answer = api.get(f"/v1/requests/{accepted['request_id']}")
        while answer.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            answer = api.get(f"/v1/requests/{accepted['request_id']}")
        error = assert_error(answer, 401)
        assert "revoked" in error["message"]
    unknown = cli("keys", "revoke", "key_0000", **store)
    assert unknown.returncode != 0 and "no key" in unknown.stderr
    stop_cleanly(fresh)

    for log in fresh.root.glob("forgeline-*.log"):
        text = log.read_text()
        assert operator not in text
        assert text.count(key) == (1 if log.name == "forgeline-1.log" else 0), log


def test_forgeline_admin_key_is_the_admin_key_and_is_never_shown(
    forgeline: Instance, url: str
) -> None:
    with forgeline.client() as api:
        who = api.get("/v1/whoami").json()
    assert who["role"] == "admin" and who["name"] == "FORGELINE_ADMIN_KEY"
    log = forgeline.log_path.read_text()
    assert ADMIN_KEY not in log and not SECRET.findall(log)
    assert "admin key  FORGELINE_ADMIN_KEY" in log


@pytest.fixture(scope="module")
def url(forgeline: Instance) -> str:
    return forgeline.url


def test_the_cli_without_a_key_says_what_to_set(url: str) -> None:
    result = cli("status", url=url)
    assert result.returncode == 1
    assert "FORGELINE_API_KEY" in result.stderr and "Traceback" not in result.stderr
    wrong = cli("status", url=url, api_key="fl_" + "w" * 43)
    assert wrong.returncode == 1 and "not valid" in wrong.stderr


def test_every_endpoint_but_the_probes_needs_a_key(forgeline: Instance) -> None:
    with httpx.Client(base_url=forgeline.url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        for method, path in (
            ("GET", "/metrics"),
            ("GET", "/v1/requests"),
            ("POST", "/v1/requests"),
            ("GET", "/v1/keys"),
            ("GET", "/v1/whoami"),
        ):
            response = anonymous.request(method, path)
            assert_error(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")

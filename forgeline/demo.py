"""`forgeline demo`: starts everything in one process, runs sample requests on a sample
repository through the real HTTP API, shows their progress and patches, stops, exits 0."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console
from rich.live import Live
from rich.syntax import Syntax
from rich.table import Table

from forgeline import demo_llm
from forgeline.bootstrap import Servers, run_services, running_servers
from forgeline.client import ForgelineClient
from forgeline.fake_llm import FakeUpstream
from forgeline.settings import Settings
from gateway import keys

console = Console(highlight=False)

ADD_SHOUT = """\
echo "adding a shout option to greet()"
cat > greeting.py <<'PY'
def greet(name: str, shout: bool = False) -> str:
    text = f"Hello, {name}!"
    return text.upper() if shout else text
PY
cat > test_greeting.py <<'PY'
from greeting import greet

def test_shout():
    assert greet("ada", shout=True) == "HELLO, ADA!"
PY
python3 -c 'from greeting import greet; print(greet("demo", shout=True))'
"""

FAILING = """\
echo "looking for a file that is not there" >&2
cat does-not-exist.txt
"""

FOLLOW_UP = """\
echo "follow-up: documenting the new option"
cat >> README.md <<'MD'

## Shouting

`greet(name, shout=True)` returns the greeting in capitals.
MD
"""

SAMPLE_FILES = {
    "README.md": "# greeting\n\nA tiny sample project for the Forgeline demo.\n",
    ".gitignore": "__pycache__/\n",
    "greeting.py": 'def greet(name: str) -> str:\n    return f"Hello, {name}!"\n',
}

TERMINAL = {"patch_ready", "failed", "cancelled"}


def run_demo(data_dir: Path | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fl-demo-", dir="/tmp"))
    # The demo's own admin key, made at start-up and removed at the end: a data dir the demo
    # used still gets its first admin key printed by the first `forgeline up`.
    secret = keys.generate_secret()
    settings = Settings(
        data_dir=data_dir or workdir / "data",
        port=0,
        log_level="WARNING",
        rate_limit_per_min=0,  # the demo's own key watches many requests at once
        admin_key=SecretStr(secret),
    )
    console.rule("[bold]Forgeline demo")
    try:
        with running_servers(settings, progress=lambda m: console.print(f"[dim]{m}[/dim]")) as s:
            return asyncio.run(_demo(settings, s, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _demo(settings: Settings, servers: Servers, workdir: Path) -> int:
    async with FakeUpstream(demo_llm.fake_script()) as fake:
        console.print(f"LLM agents call a {demo_llm.LABEL} at {fake.url}, through the LLM proxy")
        key = SecretStr(demo_llm.DEMO_UPSTREAM_KEY)
        settings = settings.model_copy(
            update={
                "llm_openai_base_url": f"{fake.url}/v1",
                "llm_openai_api_key": key,
                "llm_anthropic_base_url": fake.url,
                "llm_anthropic_api_key": key,
                "llm_prices": demo_llm.DEMO_PRICES,
            }
        )
        return await _demo_services(settings, servers, workdir)


async def _demo_services(settings: Settings, servers: Servers, workdir: Path) -> int:
    assert settings.admin_key is not None
    secret = settings.admin_key.get_secret_value()
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    status: dict[str, str] = {}
    services = asyncio.create_task(
        run_services(
            settings,
            servers,
            stop,
            on_ready=lambda port: ready.set_result(port),
            status=status,
            progress=lambda line: console.print(f"[dim]{line}[/dim]"),
        )
    )
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), 600)
        console.print(f"gateway on http://127.0.0.1:{port}")
        console.print(f"workspaces: {status.get('workspaces', '?')}")
        in_docker = status.get("workspaces", "").startswith("docker")
        return await asyncio.to_thread(
            _scenario, f"http://127.0.0.1:{port}", workdir, secret, in_docker
        )
    finally:
        stop.set()
        await services
        await _forget_key(servers.database_url, secret)
        console.print("[dim]stopped everything[/dim]")


async def _forget_key(database_url: str, secret: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await keys.create_table(conn)
        await keys.delete_key(conn, secret)


def _scenario(url: str, workdir: Path, api_key: str, in_docker: bool) -> int:
    repo = _sample_repo(workdir / "sample-repo")
    console.print(f"sample repository: {repo}")
    with ForgelineClient(url, api_key) as client:
        shout = client.submit({"repo": str(repo), "prompt": ADD_SHOUT, "labels": {"demo": "1"}})
        broken = client.submit({"repo": str(repo), "prompt": FAILING, "labels": {"demo": "1"}})
        llm = client.submit(demo_llm.llm_request(str(repo), budget_usd=0.05))
        capped = client.submit(demo_llm.llm_request(str(repo), max_tokens=1000))
        tracked = {
            "add shout option": shout["request_id"],
            "failing script": broken["request_id"],
            f"LLM agent, {demo_llm.LABEL}": llm["request_id"],
            "LLM agent, max_tokens 1000": capped["request_id"],
        }
        mini = None
        if in_docker:  # the workspace image holds the real agent CLIs
            mini = client.submit(demo_llm.mini_swe_agent_request(str(repo)))
            tracked[f"mini-swe-agent, {demo_llm.LABEL}"] = mini["request_id"]
        _watch(client, tracked)
        rerun = client.rerun(shout["request_id"], FOLLOW_UP)
        tracked["rerun: document it"] = shout["request_id"]
        _wait_for_run(client, rerun["run_id"])
        _watch(client, tracked)

        first, latest = client.run(shout["run_id"]), client.run(rerun["run_id"])
        failed = client.run(broken["run_id"])
        llm_run, capped_run = client.run(llm["run_id"]), client.run(capped["run_id"])
        llm_patch = _show_llm_runs(client, llm_run, capped_run)
        patch = client.patch(rerun["run_id"])
        console.rule("patch of the rerun (cumulative)")
        console.print(Syntax(patch, "diff", theme="ansi_dark", background_color="default"))
        applies = _applies(repo, patch)
        console.rule("outcome")
        checks = {
            "first run succeeded with a patch": first["status"] == "succeeded" and first["patch"],
            "failing script ended agent_failed": (failed["error"] or {}).get("code")
            == "agent_failed",
            "rerun built on the first patch": latest["status"] == "succeeded"
            and "shout" in patch
            and "Shouting" in patch,
            "the patch applies to a clean clone": applies,
            f"LLM agent ({demo_llm.LABEL}) succeeded with a patch": llm_run["status"] == "succeeded"
            and '"""The greeting' in llm_patch,
            "its usage was recorded on the run": bool(llm_run["usage"])
            and llm_run["usage"]["input_tokens"] == 1450 + 1720,
            "the capped LLM run ended budget_exceeded": (capped_run["error"] or {}).get("code")
            == "budget_exceeded",
        }
        if mini is not None:
            mini_run = client.run(mini["run_id"])
            console.print(
                f"  mini-swe-agent: {mini_run['status']}; usage: {demo_llm.usage_line(mini_run)}"
            )
            mini_patch = client.patch(mini["run_id"]) if mini_run["patch"] else ""
            checks["mini-swe-agent (real CLI) made the same edit"] = '"""The greeting' in mini_patch
        for name, ok in checks.items():
            console.print(f"  {'[green]ok[/green]' if ok else '[red]FAILED[/red]'}  {name}")
        return 0 if all(checks.values()) else 1


def _show_llm_runs(
    client: ForgelineClient, llm_run: dict[str, Any], capped_run: dict[str, Any]
) -> str:
    """Shows the LLM runs' usage and the first one's patch; returns that patch."""
    console.print()
    console.rule(f"LLM agent runs ({demo_llm.LABEL}, through the LLM proxy)")
    for name, run in (("budget_usd 0.05", llm_run), ("max_tokens 1000", capped_run)):
        error = run["error"] or {}
        outcome = run["status"] + (f" {error.get('code')}: {error.get('message')}" if error else "")
        console.print(f"  {name}: {outcome}; usage: {demo_llm.usage_line(run)}")
    llm_patch = client.patch(llm_run["id"]) if llm_run["patch"] else ""
    console.print(Syntax(llm_patch, "diff", theme="ansi_dark", background_color="default"))
    return llm_patch


def _watch(client: ForgelineClient, tracked: dict[str, str]) -> None:
    """A live table of the requests until each is terminal."""
    deadline = time.monotonic() + 120
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        while True:
            rows = [(name, _status(client, rid)) for name, rid in tracked.items()]
            live.update(_table(rows))
            if all(status in TERMINAL for _, status in rows) or time.monotonic() > deadline:
                return
            time.sleep(0.25)


def _table(rows: list[tuple[str, str]]) -> Table:
    table = Table("request", "status", title="requests")
    colours = {"patch_ready": "green", "failed": "red"}
    for name, status in rows:
        colour = colours.get(status, "yellow")
        table.add_row(name, f"[{colour}]{status}[/{colour}]")
    return table


def _status(client: ForgelineClient, request_id: str) -> str:
    try:
        return str(client.request(request_id)["status"])
    except Exception:
        return "accepted"  # not projected yet


def _wait_for_run(client: ForgelineClient, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.run(run_id)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sample_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    for name, text in SAMPLE_FILES.items():
        (path / name).write_text(text)
    git = ["git", "-C", str(path), "-c", "user.name=Demo", "-c", "user.email=demo@example.com"]
    subprocess.run([*git[:3], "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "initial"], check=True)
    return path


def _applies(repo: Path, patch: str) -> bool:
    clone = repo.parent / "check-clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    result = subprocess.run(
        ["git", "-C", str(clone), "apply", "--check", "-"], input=patch.encode(), check=False
    )
    return result.returncode == 0

"""POST /v1/requests -> patch_ready for a trivial shell request, against its floor.

The floor is the same work done by hand in the same run, without HTTP, NATS, Postgres or
projections. Local: `git clone`, run the script, `git add -A && git diff --cached`. Docker:
`git clone` on the host, then one `docker run --rm --network none` of the workspace image that
unpacks the repository from stdin, runs the script and prints the diff. The ratio is the price
of the event-sourced, broker-based path: durability, audit history, live logs, limits.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import httpx

from forgeline.bootstrap import run_services, running_servers
from forgeline.settings import Settings

SCRIPT = "echo benchmark >> README.md\n"


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "README.md").write_text("# bench\n")
    git = ["git", "-C", str(path), "-c", "user.name=b", "-c", "user.email=b@example.com"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return path


def by_hand(repo: Path, workdir: Path, index: int) -> float:
    start = time.perf_counter()
    clone = workdir / f"hand-{index}"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(repo), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", "--detach", "HEAD"], check=True)
    script = workdir / f"hand-{index}.sh"
    script.write_text(SCRIPT)
    subprocess.run(["bash", str(script)], cwd=clone, check=True)
    subprocess.run(["git", "-C", str(clone), "add", "-A"], check=True)
    subprocess.run(
        ["git", "-C", str(clone), "diff", "--cached", "--binary", "HEAD"],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def by_hand_docker(repo: Path, workdir: Path, index: int, image: str) -> float:
    start = time.perf_counter()
    clone = workdir / f"dock-{index}"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    archive = subprocess.run(
        ["tar", "-C", str(clone), "-c", "."], check=True, capture_output=True
    ).stdout
    inside = (
        f"cd /workspace && tar x && {SCRIPT.strip()} && git add -A "
        "&& git diff --cached --binary HEAD"
    )
    subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "-i",
            "--network",
            "none",
            "--user",
            "0",
            image,
            "sh",
            "-c",
            f"git config --global --add safe.directory '*' && {inside}",
        ],
        input=archive,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


async def through_forgeline(client: httpx.AsyncClient, repo: Path) -> float:
    start = time.perf_counter()
    accepted = await client.post("/v1/requests", json={"repo": str(repo), "prompt": SCRIPT})
    accepted.raise_for_status()
    request_id = accepted.json()["request_id"]
    while True:
        response = await client.get(f"/v1/requests/{request_id}")
        if response.status_code == 200 and response.json()["status"] == "patch_ready":
            return time.perf_counter() - start
        if response.status_code == 200 and response.json()["status"] in ("failed", "cancelled"):
            run = (await client.get(f"/v1/runs/{response.json()['latest_run_id']}")).json()
            raise RuntimeError(f"benchmark request ended {run['status']}: {run['error']}")
        await asyncio.sleep(0.005)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "min_ms": ordered[0] * 1000,
        "n": len(ordered),
    }


def run(
    provisioner: Literal["local", "docker"] = "local", rounds: int = 30, warmup: int = 3
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fl-bench-", dir="/tmp"))
    repo = make_repo(workdir / "repo")
    settings = Settings(
        data_dir=workdir / "data", port=0, log_level="WARNING", provisioner=provisioner
    )
    with running_servers(settings, progress=lambda _m: None) as servers:
        forgeline = asyncio.run(_forgeline_samples(settings, servers, repo, rounds, warmup))
    if provisioner == "docker":
        hand = [
            by_hand_docker(repo, workdir, i, settings.workspace_image)
            for i in range(rounds + warmup)
        ][warmup:]
    else:
        hand = [by_hand(repo, workdir, i) for i in range(rounds + warmup)][warmup:]
    result: dict[str, Any] = {
        "case": f"post_to_patch_ready_{provisioner}",
        "forgeline": summary(forgeline),
        "by_hand": summary(hand),
    }
    result["ratio_median"] = result["forgeline"]["median_ms"] / result["by_hand"]["median_ms"]
    result["overhead_median_ms"] = result["forgeline"]["median_ms"] - result["by_hand"]["median_ms"]
    subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return result


async def _forgeline_samples(
    settings: Settings, servers: Any, repo: Path, rounds: int, warmup: int
) -> list[float]:
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    services = asyncio.create_task(
        run_services(settings, servers, stop, on_ready=lambda port: ready.set_result(port))
    )
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), 60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            samples = [await through_forgeline(client, repo) for _ in range(rounds + warmup)]
        return samples[warmup:]
    finally:
        stop.set()
        await services

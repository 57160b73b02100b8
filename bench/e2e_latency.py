"""Case 4: POST /v1/requests -> patch_ready for a no-op shell request, against its floor.

The floor is the same work done by hand in the same run, without HTTP, NATS, Postgres or
projections. Local: `git clone`, run the script, `git add -A && git diff --cached`. Docker:
`git clone` on the host, then one `docker run --rm --network none` of the workspace image that
unpacks the repository from stdin, runs the script and prints the diff. The ratio is the price
of the event-sourced, broker-based path: durability, audit history, live logs, limits.

Requests go one at a time through a Forgeline process with every role (as `forgeline up`),
polled with GET /v1/requests/{id} every 5 ms. Afterwards each request's events give the time
spent per hop (from the events' timestamps), the evidence of where the overhead goes.

`run(provisioner, rounds)` still works on its own (it makes its own servers).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx

from bench.common import (
    AUTH,
    NOOP_SCRIPT,
    Forgeline,
    Row,
    Stack,
    latency_summary,
    make_repo,
    stack,
)
from forgeline.settings import Settings

SCRIPT = NOOP_SCRIPT
POLL_S = 0.005
WORKSPACE_IMAGE = Settings().workspace_image  # the image the workers use


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
    elapsed = time.perf_counter() - start
    subprocess.run(["rm", "-rf", str(clone), str(script)], check=False)
    return elapsed


def by_hand_docker(repo: Path, workdir: Path, index: int, image: str = WORKSPACE_IMAGE) -> float:
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
    elapsed = time.perf_counter() - start
    subprocess.run(["rm", "-rf", str(clone)], check=False)
    return elapsed


async def post_until_patch_ready(client: httpx.AsyncClient, repo: Path) -> tuple[float, str, float]:
    """One request, POST to a GET showing patch_ready, polled every POLL_S: (seconds, request
    id, wall clock of the POST). The same client code for Forgeline and the Celery pipeline."""
    wall = time.time()
    start = time.perf_counter()
    accepted = await client.post("/v1/requests", json={"repo": str(repo), "prompt": SCRIPT})
    accepted.raise_for_status()
    request_id = accepted.json()["request_id"]
    while True:
        response = await client.get(f"/v1/requests/{request_id}")
        if response.status_code == 200:
            status = response.json()["status"]
            if status == "patch_ready":
                return time.perf_counter() - start, request_id, wall
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"benchmark request ended {status}: {response.json()}")
        await asyncio.sleep(POLL_S)


# Hops of one run, from its events' timestamps (each taken when the event was decided, just
# before its commit): name -> (from event, to event). "post" is the client's POST, "seen" the
# client's first GET showing patch_ready.
HOPS = [
    ("POST -> RequestSubmitted (gateway, NATS, command handler)", "post", "RequestSubmitted"),
    ("RunQueued -> ProvisioningStarted (relay, NATS, executor)", "RunQueued",
     "ProvisioningStarted"),
    ("ProvisioningStarted -> WorkspaceProvisioned (clone)", "ProvisioningStarted",
     "WorkspaceProvisioned"),
    ("WorkspaceProvisioned -> RunStarted", "WorkspaceProvisioned", "RunStarted"),
    ("RunStarted -> PatchProduced (script, diff)", "RunStarted", "PatchProduced"),
    ("PatchProduced -> RunSucceeded (logs archived)", "PatchProduced", "RunSucceeded"),
    ("RunSucceeded -> GET shows patch_ready (projector, poll)", "RunSucceeded", "seen"),
]  # fmt: skip


async def _hops(
    client: httpx.AsyncClient, done: list[tuple[float, str, float]]
) -> dict[str, dict[str, float]]:
    per_hop: dict[str, list[float]] = {name: [] for name, _, _ in HOPS}
    for seconds, request_id, wall in done:
        response = await client.get(f"/v1/requests/{request_id}/events")
        if response.status_code != 200:
            continue
        at: dict[str, float] = {"post": wall, "seen": wall + seconds}
        for event in response.json()["events"]:
            at.setdefault(event["type"], datetime.fromisoformat(event["timestamp"]).timestamp())
        for name, start, end in HOPS:
            if start in at and end in at:
                per_hop[name].append(at[end] - at[start])
    return {name: latency_summary(samples) for name, samples in per_hop.items() if samples}


async def _forgeline_samples(
    url: str, repo: Path, rounds: int, warmup: int
) -> tuple[list[tuple[float, str, float]], dict[str, dict[str, float]]]:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
        done = [await post_until_patch_ready(client, repo) for _ in range(rounds + warmup)][warmup:]
        return done, await _hops(client, done)


def measure(
    st: Stack,
    provisioner: Literal["local", "docker"],
    rounds: int,
    warmup: int = 3,
    slots: int = 4,
) -> dict[str, Any]:
    """Forgeline's and the by-hand samples, in the same run, one after the other."""
    workdir = st.dir(f"e2e-{provisioner}")
    repo = make_repo(workdir / "repo")
    shared = st.local_forgeline(slots) if provisioner == "local" else None
    if shared is not None:
        fl = shared[0]
    else:
        fl = Forgeline(
            st,
            nats_url=st.nats(f"e2e-{provisioner}"),
            database_url=st.database(f"e2e_{provisioner}"),
            provisioner=provisioner,
            slots=slots,
            name=f"e2e-{provisioner}",
        )
    try:
        done, hops = asyncio.run(_forgeline_samples(fl.url, repo, rounds, warmup))
    finally:
        if shared is None:
            fl.stop()
    if provisioner == "docker":
        hand = [by_hand_docker(repo, workdir, i) for i in range(rounds + warmup)][warmup:]
    else:
        hand = [by_hand(repo, workdir, i) for i in range(rounds + warmup)][warmup:]
    return {"forgeline": [d[0] for d in done], "by_hand": hand, "hops": hops}


def rows(provisioner: str, data: dict[str, Any]) -> list[Row]:
    value, floor = latency_summary(data["forgeline"]), latency_summary(data["by_hand"])
    overhead = value["p50"] - floor["p50"]
    floor_name = "by hand: clone, run, diff" + (" in docker run" if provisioner == "docker" else "")
    return [
        Row(
            case="4 end-to-end",
            metric=f"POST -> patch_ready, no-op, {provisioner}",
            kind="latency",
            unit="ms",
            value=value,
            floor_name=floor_name,
            floor=floor,
            note=f"overhead {overhead:.0f} ms median",
            extra={"hops_ms": data["hops"], "overhead_median_ms": overhead},
        )
    ]


def run(
    provisioner: Literal["local", "docker"] = "local", rounds: int = 30, warmup: int = 3
) -> dict[str, Any]:
    """The old entry point: its own servers, one result dict."""
    with stack() as st:
        data = measure(st, provisioner, rounds, warmup)
    forgeline, hand = latency_summary(data["forgeline"]), latency_summary(data["by_hand"])
    return {
        "case": f"post_to_patch_ready_{provisioner}",
        "forgeline": forgeline,
        "by_hand": hand,
        "ratio_median": forgeline["p50"] / hand["p50"],
        "overhead_median_ms": forgeline["p50"] - hand["p50"],
        "hops_ms": data["hops"],
        "median_of_hops_ms": {k: v["p50"] for k, v in data["hops"].items()},
    }

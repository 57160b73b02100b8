"""/metrics: Prometheus text that prometheus_client's parser reads, and that moves with runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import eventually
from tests.integration.test_auth import (  # noqa: F401
    ADMIN_KEY,
    Start,
    bearer,
    start,
    submit,
    wait_status,
)

DASHBOARD = "deploy/grafana-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient) -> Samples:
    answer = await http.get("/metrics", headers=bearer(ADMIN_KEY))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):  # raises on a bad line
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_parse_and_move_with_runs(start: Start, git_repo: Path) -> None:  # noqa: F811
    async with start() as http:
        before = await scrape(http)
        for name in (
            "forgeline_queue_depth",
            "forgeline_queue_oldest_seconds",
            "forgeline_store_position",
            "forgeline_projection_lag",
            "forgeline_relay_lag",
            "forgeline_dead_letters",
        ):
            assert any(key[0] == name for key in before), name
        assert value(before, "forgeline_run_duration_seconds_count", status="succeeded") == 0

        accepted = await submit(http, ADMIN_KEY, git_repo, prompt="sleep 0.2; echo hi > hi.txt")
        await wait_status(http, accepted["request_id"], {"patch_ready"})
        failed = await submit(http, ADMIN_KEY, git_repo, prompt="exit 3")
        await wait_status(http, failed["request_id"], {"failed"})

        async def settled() -> Samples | None:
            now = await scrape(http)
            lags = value(now, "forgeline_relay_lag") + value(now, "forgeline_projection_lag")
            return now if lags == 0 else None

        after: Samples = await eventually(settled, 15, "relay and projector caught up")
        assert value(after, "forgeline_requests", status="patch_ready") == 1
        assert value(after, "forgeline_requests", status="failed") == 1
        assert value(after, "forgeline_runs", status="succeeded") == 1
        assert value(after, "forgeline_run_duration_seconds_count", status="succeeded") == 1
        assert value(after, "forgeline_run_duration_seconds_count", status="failed") == 1
        assert value(after, "forgeline_run_duration_seconds_sum", status="succeeded") >= 0.2
        assert (
            value(after, "forgeline_run_duration_seconds_bucket", status="succeeded", le="+Inf")
            == 1
        )
        assert value(after, "forgeline_store_position") > value(before, "forgeline_store_position")
        assert value(after, "forgeline_relay_position") == value(after, "forgeline_store_position")
        assert value(after, "forgeline_queue_depth") == 0
        # The worker runs in this process: its provisioning time is here too (a process-wide
        # counter: other tests of the session may have added to it, never taken away).
        provisioned = value(
            after, "forgeline_provisioning_seconds_count", provisioner="local", outcome="ok"
        )
        assert provisioned >= 2 + value(
            before, "forgeline_provisioning_seconds_count", provisioner="local", outcome="ok"
        )
        assert value(after, "forgeline_agent_runs_with_usage", agent="shell") == 0

        # The Grafana dashboard asks only for metrics that exist.
        exported = {name for name, _ in after}
        dashboard = json.loads((Path(__file__).parents[2] / DASHBOARD).read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        used = {n for e in exprs for n in re.findall(r"forgeline_[a-z_]+", e)}
        assert used and used <= exported, used - exported

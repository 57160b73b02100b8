"""/metrics of processes without a gateway: `forgeline worker|relay|projector --metrics-port`
as separate processes against one NATS and one Postgres, scraped while a run goes through them
and parsed with prometheus_client's parser."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.commands import publish_command
from broker.connection import connect
from domain.commands import RequestSpec, SubmitRequest
from tests.e2e.support import clean_env, forgeline_executable
from tests.helpers import free_port, wait_until
from tests.integration.conftest import event_type_counts, in_thread, store_positions

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@contextmanager
def role(
    name: str, env: dict[str, str], log: Path, *flags: str
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [forgeline_executable(), name, *flags],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def test_worker_relay_and_projector_each_serve_their_own_metrics(
    own_nats: str, database_url: str, git_repo: Path, tmp_path: Path
) -> None:
    env = clean_env(
        nats_url=own_nats,
        database_url=database_url,
        data_dir=str(tmp_path / "data"),
        provisioner="local",
        worker_slots="2",
    )
    ports = {name: free_port() for name in ("worker", "relay", "projector")}
    flag = tmp_path / "go"
    with ExitStack() as stack:
        for name, port in ports.items():
            stack.enter_context(
                role(name, env, tmp_path / f"{name}.log", "--metrics-port", str(port))
            )

        def up() -> bool:
            return all(scrape(port) for port in ports.values())

        async def until(predicate: Callable[[], object], timeout: float, what: str) -> Any:
            try:
                return await in_thread(wait_until, predicate, timeout, what)
            except AssertionError as exc:
                logs = {n: (tmp_path / f"{n}.log").read_text()[-3000:] for n in ports}
                raise AssertionError(f"{exc}; the processes' logs: {logs}") from None

        await until(up, 60, "the three metrics endpoints")
        worker = scrape(ports["worker"])
        assert value(worker, "forgeline_worker_slots") == 2
        assert value(worker, "forgeline_runs_active") == 0
        assert value(worker, "process_cpu_seconds_total") is not None

        # A run that waits for the test's go, as the gateway would submit it.
        nc = await connect(own_nats, name="test")
        try:
            request_id, run_id = uuid.uuid4(), uuid.uuid4()
            prompt = f"while [ ! -e {flag} ]; do sleep 0.05; done; echo done > done.txt"
            await publish_command(
                nc.jetstream(),
                SubmitRequest(
                    command_id=f"submit:{request_id}",
                    request_id=request_id,
                    run_id=run_id,
                    spec=RequestSpec(repo=str(git_repo), prompt=prompt),
                ),
            )
        finally:
            await nc.close()

        def running() -> bool:
            return value(scrape(ports["worker"]), "forgeline_runs_active") == 1

        await until(running, 30, "forgeline_runs_active to be 1")
        flag.touch()

        def finished() -> bool:
            return event_type_counts(database_url)["RunSucceeded"] == 1

        await until(finished, 30, "the run to succeed")

        def worker_done() -> Samples | None:
            samples = scrape(ports["worker"])
            return samples if value(samples, "forgeline_runs_active") == 0 else None

        worker = await until(worker_done, 10, "runs_active back to 0")
        ok = {"provisioner": "local", "outcome": "ok"}
        assert value(worker, "forgeline_provisioning_seconds_count", **ok) == 1
        assert value(worker, "forgeline_provisioning_seconds_bucket", le="+Inf", **ok) == 1

        # The relay and the projector catch up with the store: lag 0 at the store's position.
        store_position = max(await in_thread(store_positions, database_url))
        for name, family in (("relay", "relay"), ("projector", "projection")):

            def caught_up(port: int = ports[name], family: str = family) -> Samples | None:
                samples = scrape(port)
                lag = value(samples, f"forgeline_{family}_lag")
                return samples if lag == 0 else None

            samples = await until(caught_up, 15, f"{name} lag 0")
            assert value(samples, f"forgeline_{family}_position") == store_position, name
            assert value(samples, "forgeline_store_position") == store_position, name
            assert value(samples, "forgeline_worker_slots") is None, name  # not a worker
        # The relay's endpoint has no projection figures, and the other way round.
        assert value(scrape(ports["relay"]), "forgeline_projection_lag") is None
        assert value(scrape(ports["projector"]), "forgeline_relay_lag") is None


@pytest.mark.parametrize("setting", ["flag", "taken"])
def test_a_metrics_port_that_cannot_be_used_stops_the_process_with_the_reason(
    setting: str, own_nats: str, database_url: str, tmp_path: Path
) -> None:
    env = clean_env(nats_url=own_nats, database_url=database_url, data_dir=str(tmp_path / "data"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if setting == "flag":
            args, code, reason = ["--metrics-port", "nope"], 2, "invalid int value: 'nope'"
        else:
            port = str(taken.getsockname()[1])
            args, code = ["--metrics-port", port], 1
            reason = f"the metrics endpoint could not listen on 127.0.0.1:{port}"
        done = subprocess.run(
            [forgeline_executable(), "relay", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == code, done.stderr
    assert reason in done.stderr

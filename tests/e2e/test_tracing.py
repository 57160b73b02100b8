"""OpenTelemetry traces as an operator sees them in their collector: one `forgeline up` with an
OTLP endpoint configured exports one trace per submitted request, from the gateway's HTTP span
through the command on NATS and the command handler to the executor's steps; without an
endpoint no exporter exists, and an unsupported exporter setting is refused at start."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import stop_cleanly
from tests.e2e.support import (
    Instance,
    clean_env,
    forgeline_executable,
    make_repo,
    short_tmp_dir,
    submit,
    wait_request,
)
from tests.helpers import wait_until
from tests.otlp import ReceivedSpan, Receiver, otlp_receiver

EXECUTOR_STEPS = {"forgeline.claim", "forgeline.attempt", "forgeline.provision", "forgeline.agent"}


class TracedInstance(Instance):
    """`forgeline up` exporting its spans to an OTLP/HTTP endpoint."""

    def __init__(self, root: Path, endpoint: str) -> None:
        super().__init__(root)
        self.endpoint = endpoint

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in super().env().items() if not k.startswith("OTEL_")}
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.endpoint
        env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export every 0.1 s, not every 5 s
        return env


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Instance, Receiver]]:
    with otlp_receiver() as (endpoint, receiver):
        instance = TracedInstance(short_tmp_dir(), endpoint)
        try:
            instance.start(ready_timeout=60)
            yield instance, receiver
            stop_cleanly(instance)
        finally:
            instance.cleanup()


def spans_of_trace(receiver: Receiver, trace_id: str, *names: str) -> dict[str, ReceivedSpan]:
    """The trace's spans by name once every name has arrived (AssertionError after 15 s)."""

    def arrived() -> dict[str, ReceivedSpan] | None:
        spans = {s.name: s for s in receiver.snapshot() if s.trace_id == trace_id}
        return spans if set(names) <= set(spans) else None

    result = wait_until(arrived, 15, f"spans {sorted(names)} of trace {trace_id}")
    assert isinstance(result, dict)
    return result


def test_a_request_is_one_trace_from_the_gateway_to_the_executor(
    traced: tuple[Instance, Receiver], tmp_path: Path
) -> None:
    instance, receiver = traced
    assert "tracing on: spans exported over OTLP/HTTP as service forgeline" in (
        instance.log_path.read_text()
    )
    repo = make_repo(tmp_path / "repo", {"greeting.txt": "hello\n"})
    # The client's own trace: Forgeline's spans continue it.
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    with instance.client() as api:
        api.headers["traceparent"] = f"00-{trace_id}-{client_span}-01"
        accepted = submit(api, repo, "printf 'hello, world\\n' > greeting.txt")
        view = wait_request(api, accepted["request_id"])
    assert view["status"] == "patch_ready", view
    request_id, run_id = accepted["request_id"], accepted["run_id"]

    http = "POST /v1/requests"
    send, process = "send forgeline.cmd.submit", "process forgeline.cmd.submit"
    spans = spans_of_trace(
        receiver,
        trace_id,
        http,
        send,
        process,
        "forgeline.decide",
        "forgeline.run",
        "forgeline.patch",
        *EXECUTOR_STEPS,
    )
    assert {s.service for s in spans.values()} == {"forgeline"}

    # gateway -> NATS -> command handler
    assert (spans[http].kind, spans[http].parent_id) == ("server", client_span)
    assert spans[http].attributes["http.response.status_code"] == 202
    assert spans[http].attributes["http.route"] == "/v1/requests"
    assert (spans[send].kind, spans[send].parent_id) == ("producer", spans[http].span_id)
    assert (spans[process].kind, spans[process].parent_id) == ("consumer", spans[send].span_id)
    for name in (send, process):
        assert spans[name].attributes["forgeline.request_id"] == request_id
        assert spans[name].attributes["forgeline.run_id"] == run_id
        assert spans[name].attributes["messaging.system"] == "nats"
    assert spans["forgeline.decide"].parent_id == spans[process].span_id

    # command handler -> executor, across the events the command caused
    run = spans["forgeline.run"]
    assert (run.kind, run.parent_id) == ("consumer", spans[process].span_id)
    assert spans["forgeline.claim"].parent_id == run.span_id
    assert spans["forgeline.attempt"].parent_id == run.span_id
    for step in ("forgeline.provision", "forgeline.agent", "forgeline.patch"):
        assert spans[step].parent_id == spans["forgeline.attempt"].span_id, step
    for step in EXECUTOR_STEPS | {"forgeline.run", "forgeline.patch"}:
        assert spans[step].attributes["forgeline.run_id"] == run_id, step
        assert spans[step].status_code != 2, step  # no error
    for step in ("forgeline.attempt", "forgeline.provision", "forgeline.agent"):
        assert spans[step].attributes["forgeline.request_id"] == request_id, step
    assert spans["forgeline.agent"].attributes["forgeline.exit_code"] == 0

    # Probes are not traced.
    with httpx.Client(base_url=instance.url) as plain:
        assert plain.get("/healthz").status_code == 200
    assert not [s for s in receiver.snapshot() if s.attributes.get("url.path") == "/healthz"]


def test_without_an_endpoint_no_exporter_is_created(tmp_path: Path) -> None:
    """The tracing setup of a server process, with the machine's OTEL_* left out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    script = (
        "import sys\n"
        "from opentelemetry import trace\n"
        "from forgeline.tracing import start_tracing, traced_asgi\n"
        "from forgeline.startup import ALL_ROLES\n"
        "from broker import tracing\n"
        "assert start_tracing(ALL_ROLES) is False\n"
        "assert not tracing.enabled()\n"
        "app = object()\n"
        "assert traced_asgi(app) is app\n"
        "assert not trace.get_tracer('t').start_span('x').is_recording()\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry.sdk')"
        " or m.startswith('opentelemetry.exporter')]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    assert "tracing on" not in done.stderr


def test_an_unsupported_exporter_setting_is_refused_at_start() -> None:
    """The CLI's answer; tests/unit/test_tracing_settings.py has every combination."""
    variable, value, message = "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "only http/protobuf"
    root = short_tmp_dir()
    env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", variable: value})
    done = subprocess.run(
        [forgeline_executable(), "up", "--data-dir", str(root / "data")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 2, done.stderr
    assert f"forgeline: invalid setting: {variable}={value}: {message}" in done.stderr
    assert "starting embedded" not in done.stderr  # refused before anything started

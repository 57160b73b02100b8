"""When tracing is on, from the standard OTEL_* variables (forgeline/tracing.py): pure checks of
the environment, no SDK set up (that is once per process: tests/e2e/test_tracing.py)."""

from __future__ import annotations

import pytest

from forgeline.startup import ALL_ROLES
from forgeline.tracing import TracingConfigError, exporter_configured, service_name

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, False),
        (ENDPOINT, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
        # The traces' own protocol wins over the general one.
        (
            {
                **ENDPOINT,
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            True,
        ),
    ],
)
def test_tracing_is_on_only_with_an_endpoint_and_not_turned_off(
    env: dict[str, str], on: bool
) -> None:
    assert exporter_configured(env) is on


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc: only http/protobuf is supported",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/json: only http/protobuf is supported",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            "OTEL_TRACES_EXPORTER=zipkin: only otlp (or none) is supported",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp,console"},
            "OTEL_TRACES_EXPORTER=otlp,console: only otlp (or none) is supported",
        ),
    ],
)
def test_an_exporter_this_build_lacks_is_refused_by_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(TracingConfigError) as refused:
        exporter_configured({**ENDPOINT, **env})
    assert str(refused.value).startswith(message)


def test_service_names_say_the_roles() -> None:
    assert service_name(ALL_ROLES) == "forgeline"
    assert service_name(frozenset({"worker"})) == "forgeline-worker"

"""`/metrics` of one process on its own port (`--metrics-port`, FORGELINE_METRICS_PORT), for the
processes the gateway's /metrics cannot see: `forgeline worker`, `relay` and `projector` run
on their own (docs/observability.md).

It serves this process's default prometheus_client registry (the worker's
`forgeline_runs_active` and `forgeline_provisioning_seconds`, `process_*`, `python_*`) and,
read at each scrape, what the roles running here are behind on: a relay its position and lag,
a projector its position and lag (the same families as the gateway's /metrics), a worker its
slots. No API key: it holds no request data; listen on a private address (FORGELINE_HOST).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

import psycopg
import uvicorn
from nats.js import JetStreamContext
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.relay import published_position
from domain.application import EVENTS_TABLE
from forgeline.settings import Settings
from forgeline.startup import StartupError
from forgeline.worker_processes import own_slots
from gateway.health import PROJECTOR_NAME
from projections.schema import POSITIONS_TABLE

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TIMEOUT_S = 2.0


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


class RoleMetrics:
    """What the roles of this process report at a scrape, read from the store and NATS."""

    def __init__(
        self, roles: frozenset[str], settings: Settings, database_url: str, js: JetStreamContext
    ) -> None:
        self.roles = roles
        self.settings = settings
        self.database_url = database_url
        self.js = js

    async def families(self) -> list[Metric]:
        out: list[Metric] = []
        if "worker" in self.roles:
            out.append(
                _gauge(
                    "forgeline_worker_slots",
                    "Runs this worker process executes at once (its share of"
                    " FORGELINE_WORKER_SLOTS).",
                    own_slots(self.settings),
                )
            )
        if not {"relay", "projector"} & self.roles:
            return out
        store, projected = await asyncio.to_thread(self._positions)
        out.append(
            _gauge(
                "forgeline_store_position",
                "Position of the newest event in the event store.",
                store,
            )
        )
        if "projector" in self.roles and projected is not None:
            out += [
                _gauge(
                    "forgeline_projection_position",
                    "Last store position in the read tables.",
                    projected,
                ),
                _gauge(
                    "forgeline_projection_lag",
                    "Store positions not yet in the read tables (positions can have gaps).",
                    max(0, store - projected),
                ),
            ]
        if "relay" in self.roles:
            relay = await self._relay_position()
            if relay is not None:
                out += [
                    _gauge(
                        "forgeline_relay_position",
                        "Last store position the relay published.",
                        relay,
                    ),
                    _gauge(
                        "forgeline_relay_lag",
                        "Store positions not yet published to FORGELINE_EVENTS (positions can "
                        "have gaps).",
                        max(0, store - relay),
                    ),
                ]
        return out

    def _positions(self) -> tuple[int, int | None]:
        with psycopg.connect(self.database_url, connect_timeout=5, autocommit=True) as conn:
            row = conn.execute(
                sql.SQL("SELECT coalesce(max(notification_id), 0) FROM {t}").format(
                    t=sql.Identifier(EVENTS_TABLE)
                )
            ).fetchone()
            store = int(row[0]) if row else 0
            row = conn.execute(
                sql.SQL("SELECT position FROM {t} WHERE name = %s").format(
                    t=sql.Identifier(POSITIONS_TABLE)
                ),
                (PROJECTOR_NAME,),
            ).fetchone()
        return store, (int(row[0]) if row else None)

    async def _relay_position(self) -> int | None:
        try:
            return await asyncio.wait_for(published_position(self.js), _TIMEOUT_S)
        except Exception as exc:  # NATS away: no relay metrics rather than wrong ones
            log.warning("metrics: no relay position: %s", type(exc).__name__)
            return None


def metrics_app(role_metrics: RoleMetrics) -> Starlette:
    async def metrics(request: Request) -> Response:
        try:
            families = await role_metrics.families()
        except (psycopg.Error, OSError) as exc:
            log.warning("metrics: the store does not answer: %s", type(exc).__name__)
            return Response("the store does not answer; retry later\n", status_code=503)
        text = generate_latest(_Families(families)) + generate_latest(REGISTRY)
        return Response(text, media_type=CONTENT_TYPE)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])


class _QuietServer(uvicorn.Server):
    """Uvicorn without its own signal handling: the process's stop event governs it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_metrics(
    role_metrics: RoleMetrics,
    host: str,
    port: int,
    stop: asyncio.Event,
    progress: Callable[[str], None] = log.info,
) -> None:
    """Serves /metrics on host:port until stop is set; StartupError when it cannot listen."""
    config = uvicorn.Config(
        metrics_app(role_metrics),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
    server = _QuietServer(config)
    serving = asyncio.create_task(_serve_or_explain(server, host, port))
    while not server.started:
        if serving.done():
            await serving  # raises StartupError: why it could not listen
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    progress(f"metrics on http://{host}:{bound}/metrics")
    await stop.wait()
    server.should_exit = True
    await serving


async def _serve_or_explain(server: uvicorn.Server, host: str, port: int) -> None:
    """Uvicorn exits the process when it cannot bind; make it an error that names the fix."""
    try:
        await server.serve()
    except SystemExit:
        raise StartupError(
            f"the metrics endpoint could not listen on {host}:{port} (is the port taken? pick "
            "another with --metrics-port or FORGELINE_METRICS_PORT)"
        ) from None
    if not server.started:
        raise StartupError(f"the metrics endpoint could not listen on {host}:{port}")

"""The composition root: starts the servers (embedded or external) and wires every component.

Roles: `gateway` (HTTP), `worker` (command handler + executor), `relay` (store -> NATS),
`projector` (store -> read tables). `forgeline up` runs them all in one process; each can also
run on its own for a distributed deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
import uvicorn
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from broker import subjects
from broker.connection import connect
from broker.consumer import consume_batches, durable_config
from broker.relay import Relay
from broker.streams import StreamSettings, ensure_streams
from domain.application import Forgeline
from forgeline import child_watcher
from forgeline.llm_proxy import WorkerLlmProxy
from forgeline.process_metrics import RoleMetrics, serve_metrics
from forgeline.provisioning import Workspaces, open_workspaces
from forgeline.settings import Settings, eventsourcing_env
from forgeline.startup import ALL_ROLES, StartupError
from forgeline.store_integrity import ensure_store_integrity
from forgeline.store_wakeups import StoreWakeups
from forgeline.tracing import traced_asgi
from forgeline.worker_processes import ExtraWorkerProcesses, own_slots
from gateway import idempotency
from gateway import keys as api_keys
from gateway.app import create_app
from gateway.deps import GatewayDeps
from handlers.agents import all_agents
from handlers.agents.base import Agent
from handlers.breaker import EngineBreaker
from handlers.commands import command_batch_handler
from handlers.execution import Executor, ExecutorSettings
from handlers.retry_policy import HANDLER_RETRY
from handlers.scheduling import POOL_OPTIONS as QUEUE_POOL_OPTIONS
from handlers.scheduling import RunQueue
from projections.runner import ProjectionRunner
from projections.schema import SCHEMA_LOCK_KEY
from projections.views import Views

log = logging.getLogger("forgeline")


@dataclass
class Servers:
    """Where NATS and Postgres are, and how to stop the ones this process started."""

    nats_url: str
    database_url: str
    embedded: list[str] = field(default_factory=list)
    _stops: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()
        self._stops.clear()


def start_servers(settings: Settings, progress: Callable[[str], None] = log.info) -> Servers:
    """Starts the embedded servers the settings do not point elsewhere."""
    from forgeline import embedded  # imported here: external deployments never need it

    servers = Servers(nats_url=settings.nats_url or "", database_url=settings.database_url or "")
    try:
        if not settings.nats_url:
            progress(f"starting embedded NATS JetStream in {settings.data_dir / 'nats'}")
            nats = embedded.start_nats(
                settings.data_dir / "nats", sync_always=settings.nats_sync_always
            )
            servers.nats_url = nats.url
            servers.embedded.append("nats")
            servers._stops.append(nats.stop)
        if not settings.database_url:
            progress(f"starting embedded Postgres in {settings.data_dir / 'postgres'}")
            pg = embedded.start_postgres(settings.data_dir / "postgres")
            servers.database_url = pg.url("forgeline")
            servers.embedded.append("postgres")
            servers._stops.append(pg.stop)
    except BaseException:
        servers.stop()
        raise
    return servers


@contextlib.contextmanager
def running_servers(
    settings: Settings, progress: Callable[[str], None] = log.info
) -> Iterator[Servers]:
    servers = start_servers(settings, progress)
    try:
        yield servers
    finally:
        servers.stop()


# Postgres' CREATE TABLE IF NOT EXISTS races with itself across processes (a unique violation
# in pg_type): processes starting together take an advisory lock around schema creation.


def open_store(database_url: str, cipher_key: SecretStr | None = None) -> Forgeline:
    """The event store application; creates its tables on first use. The cipher key (default:
    FORGELINE_CIPHER_KEY) encrypts event states at rest."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
        try:
            return Forgeline(env=eventsourcing_env(database_url, cipher_key))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_KEY,))


def installation_id(database_url: str) -> str:
    """This installation's id, made once and kept in its database: it tells this event store's
    workspace containers from another's on a shared Docker engine."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS forgeline_installation (id uuid PRIMARY KEY,"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO forgeline_installation (id) SELECT gen_random_uuid()"
            " WHERE NOT EXISTS (SELECT 1 FROM forgeline_installation)"
        )
        row = conn.execute("SELECT id FROM forgeline_installation").fetchone()
    assert row is not None
    return str(row[0])


class _QuietServer(uvicorn.Server):
    """Uvicorn without its own signal handling: the process's stop event governs it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_services(
    settings: Settings,
    servers: Servers,
    stop: asyncio.Event,
    roles: frozenset[str] = ALL_ROLES,
    on_ready: Callable[[int], None] | None = None,
    status: dict[str, str] | None = None,
    progress: Callable[[str], None] = log.info,
    on_first_key: Callable[[str], None] | None = None,
    agents: Mapping[str, Agent] | None = None,
) -> None:
    """Runs the roles until stop is set or one of them fails; then closes everything.

    on_ready gets the gateway's port (0 without a gateway) once everything runs; status, when
    given, is filled with what was chosen at start-up (e.g. status["workspaces"]); progress
    shows long start-up work (building the workspace image). on_first_key, when given, is
    handed the secret of a first admin key made because the store holds no key at all (once:
    never again on this store), before on_ready; without it no such key is made. With
    settings.admin_key (FORGELINE_ADMIN_KEY), that key is made an admin key instead. agents,
    when given, replaces the agent adapters a worker runs (tests).
    """
    child_watcher.install()  # a worker's children reaped through pidfds, not a thread each
    app = await anyio.to_thread.run_sync(open_store, servers.database_url, settings.cipher_key)
    try:
        # Hash chains and append-only triggers on the events table (idempotent).
        await anyio.to_thread.run_sync(ensure_store_integrity, servers.database_url)
        nc = await connect(servers.nats_url, name=f"forgeline-{settings.worker_name}")
    except BaseException:
        await anyio.to_thread.run_sync(app.close)
        raise
    js = nc.jetstream()
    pool: AsyncConnectionPool[Any] | None = None
    pools: list[AsyncConnectionPool[Any]] = []
    workspaces: Workspaces | None = None
    llm_proxy: WorkerLlmProxy | None = None
    try:
        await ensure_streams(js, StreamSettings(replicas=settings.stream_replicas))
        wakeups = StoreWakeups(servers.database_url)
        projector = ProjectionRunner(
            app, servers.database_url, idle=wakeups.idle_waiter() if "projector" in roles else None
        )
        await anyio.to_thread.run_sync(projector.create_tables)
        if "projector" not in roles:
            projector.close()  # its connection served the tables only
        if "worker" in roles:  # first: it may fail (no engine, no image) before anything runs
            installation = await anyio.to_thread.run_sync(installation_id, servers.database_url)
            llm_proxy = await anyio.to_thread.run_sync(
                WorkerLlmProxy.create, settings, app, servers.database_url
            )
            workspaces = await open_workspaces(
                settings, app, installation, progress, llm_socket_dir=llm_proxy.socket_dir
            )
            llm_proxy.listen(workspaces.provisioner.name)
            if status is not None:
                status["workspaces"] = workspaces.description
                status["llm_proxy"] = llm_proxy.description
        jobs: list[Coroutine[Any, Any, None]] = []
        if "projector" in roles:
            jobs.append(projector.run(stop))
        if "relay" in roles:
            jobs.append(Relay(app, js, idle=wakeups.idle_waiter()).run(stop))
        if "projector" in roles or "relay" in roles:
            jobs.append(wakeups.run(stop))
        if workspaces is not None and llm_proxy is not None:
            queue_pool = AsyncConnectionPool(
                servers.database_url,
                min_size=1,
                max_size=4,
                open=False,
                kwargs={"autocommit": True, "options": QUEUE_POOL_OPTIONS},
            )
            await queue_pool.open()
            pools.append(queue_pool)
            jobs += await _worker_jobs(
                settings,
                app,
                js,
                stop,
                workspaces,
                queue_pool,
                llm_proxy,
                agents or default_agents(),
            )
            if settings.worker_processes > 1:  # the slots shared with sibling processes
                siblings = ExtraWorkerProcesses(settings, servers.nats_url, servers.database_url)
                jobs.append(siblings.run(stop))
        if "gateway" in roles:
            pool = AsyncConnectionPool(servers.database_url, min_size=1, max_size=10, open=False)
            await pool.open()
            await idempotency.create_table(pool)
            await _start_up_keys(settings, pool, on_first_key)
            deps = GatewayDeps(
                nc=nc,
                js=js,
                pool=pool,
                views=Views(pool),
                app=app,
                max_body_bytes=settings.max_body_bytes,
                rate_limit_per_min=settings.rate_limit_per_min,
                rate_limit_burst=settings.rate_limit_burst,
                key_cache_s=settings.api_key_cache_s,
                cors_origins=tuple(settings.cors_origins),
            )
            jobs.append(_serve_http(settings, deps, stop, on_ready))
        elif on_ready is not None:
            on_ready(0)
        if settings.metrics_port is not None:  # this process's own /metrics
            metrics = RoleMetrics(roles, settings, servers.database_url, js)
            jobs.append(
                serve_metrics(metrics, settings.host, settings.metrics_port, stop, progress)
            )
        await _run_until_stopped(jobs, stop)
    finally:
        if llm_proxy is not None:
            await llm_proxy.close()
        if workspaces is not None:
            await workspaces.close()
        if pool is not None:
            await pool.close()
        for other in pools:
            await other.close()
        with contextlib.suppress(Exception):
            await nc.drain()
        await anyio.to_thread.run_sync(app.close)


async def _start_up_keys(
    settings: Settings,
    pool: AsyncConnectionPool[Any],
    on_first_key: Callable[[str], None] | None,
) -> None:
    """The keys table; FORGELINE_ADMIN_KEY made an admin key, or a first admin key shown."""
    configured = settings.admin_key.get_secret_value() if settings.admin_key else None
    async with pool.connection() as conn:
        await api_keys.create_table(conn)
        done = await api_keys.start_up(
            conn, configured=configured, make_first=on_first_key is not None
        )
    key = done.configured
    if key is not None and key.revoked_at is not None:
        log.warning(
            "FORGELINE_ADMIN_KEY is the key %s, which was revoked: it stays revoked (set another"
            " key, or unset it)",
            key.id,
        )
    elif key is not None and key.role is not api_keys.Role.ADMIN:
        log.warning(
            "FORGELINE_ADMIN_KEY is the key %s, whose role is %s, not admin: it keeps its role",
            key.id,
            key.role.value,
        )
    if done.first_secret is not None and on_first_key is not None:
        on_first_key(done.first_secret)


def default_agents() -> dict[str, Agent]:
    return all_agents()


async def _worker_jobs(
    settings: Settings,
    app: Forgeline,
    js: Any,
    stop: asyncio.Event,
    workspaces: Workspaces,
    queue_pool: AsyncConnectionPool[Any],
    llm_proxy: WorkerLlmProxy,
    agents: Mapping[str, Agent],
) -> list[Coroutine[Any, Any, None]]:
    provisioner = workspaces.provisioner
    probe = getattr(provisioner, "ping", None)  # engines that can be down: Docker
    executor = Executor(
        app,
        js,
        provisioner,
        agents,
        ExecutorSettings(
            worker=settings.worker_name,
            slots=own_slots(settings),
            max_attempts=settings.max_attempts,
            patch_max_bytes=settings.patch_max_bytes,
            shutdown_grace_s=settings.shutdown_grace_s,
            ack_wait_s=settings.run_ack_wait_s,
            lost_run_policy=settings.lost_run_policy,
            infra_retries=settings.infra_retries,
            infra_backoff_s=settings.infra_backoff_s,
        ),
        queue=RunQueue(
            queue_pool,
            lease_s=settings.run_ack_wait_s,
            global_slots=settings.global_slots,
            fairness_label=settings.fairness_label,
        ),
        breaker=EngineBreaker(
            probe,
            threshold=settings.engine_breaker_threshold,
            probe_interval_s=settings.engine_probe_interval_s,
        ),
        discard=getattr(provisioner, "discard", None),
        llm=llm_proxy.grants,
    )
    commands = consume_batches(
        js,
        subjects.COMMANDS_STREAM,
        durable_config(subjects.COMMAND_HANDLER_DURABLE, [subjects.COMMANDS_SUBJECTS]),
        command_batch_handler(app, js),  # js: records each run's trace when tracing is on
        stop,
        retry=HANDLER_RETRY,
    )
    return [commands, executor.run(stop), workspaces.reap_forever(stop), llm_proxy.serve(stop)]


async def _serve_http(
    settings: Settings,
    deps: GatewayDeps,
    stop: asyncio.Event,
    on_ready: Callable[[int], None] | None,
) -> None:
    config = uvicorn.Config(
        traced_asgi(create_app(deps)),  # a span per request when tracing is on
        host=settings.host,
        port=settings.port,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
    server = _QuietServer(config)
    serving = asyncio.create_task(_serve_or_explain(server, settings))
    while not server.started:
        if serving.done():
            await serving  # raises StartupError: why it could not listen
            raise StartupError(f"the gateway could not listen on {settings.host}:{settings.port}")
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    if on_ready is not None:
        on_ready(port)
    await stop.wait()
    server.should_exit = True
    await serving


async def _serve_or_explain(server: uvicorn.Server, settings: Settings) -> None:
    """Uvicorn logs a failed bind and exits the process; make it an error that names the fix."""
    try:
        await server.serve()
    except SystemExit:
        raise StartupError(
            f"the gateway could not listen on {settings.host}:{settings.port} (is the port "
            "taken? pick another with --port or FORGELINE_PORT)"
        ) from None


async def _run_until_stopped(jobs: list[Coroutine[Any, Any, None]], stop: asyncio.Event) -> None:
    """A failing job stops the others: a half-running process is worse than a stopped one."""
    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise task.exception()  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

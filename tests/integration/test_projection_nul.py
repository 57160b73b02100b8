"""An event holding U+0000 (Postgres text and jsonb cannot) projects with U+FFFD instead of
stopping the projector, live and in a bulk rebuild; the event store keeps the original."""

from __future__ import annotations

import uuid

import psycopg
from psycopg_pool import AsyncConnectionPool

from domain.application import Forgeline
from domain.commands import RequestSpec
from domain.request import Request
from domain.status import FailureCode
from projections.apply import projectable
from projections.rebuild import rebuild_and_swap
from projections.runner import ProjectionRunner
from projections.schema import LIVE_PREFIX
from projections.views import Views
from tests.integration.conftest import in_thread
from tests.integration.test_projections import STATS, caught_up, running, table_rows

NUL_DIFF = "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\x00c\n"


def store_nul_events(app: Forgeline) -> tuple[uuid.UUID, uuid.UUID]:
    """A request as an old store may hold it (before the gateway refused U+0000; label and
    option checks bypassed), a run that failed with U+0000 in its message and a patch holding
    U+0000 (a NUL byte past the first 8000 bytes of a file: git diffs it as text)."""
    spec = RequestSpec.model_construct(
        repo="/srv/re\x00po",
        ref="ma\x00in",
        prompt="echo a\x00b",
        agent="shell",
        agent_options={"op\x00t": ["x\x00", {"k": "v\x00"}]},
        priority=3,
        timeout_s=60,
        labels={"project": "we\x00b"},
    )
    request, run = Request.submit(
        request_id=uuid.uuid4(), run_id=uuid.uuid4(), spec=spec, command_id="cmd-nul"
    )
    app.save(request, run)
    run = app.get_run(run.id)
    run.start_provisioning("worker-1")
    run.record_workspace("local", "c0ffee" * 6 + "ab")
    run.start()
    run.record_patch(NUL_DIFF, {**STATS, "bytes": len(NUL_DIFF)})
    run.fail(
        FailureCode.AGENT_FAILED,
        "exit 1: bad\x00byte",
        exit_code=1,
        log_lines=1,
        log_sha256="f" * 64,
    )
    app.save(run)
    return request.id, run.id


def test_projectable_replaces_nul_everywhere_and_leaves_the_rest() -> None:
    value = {"k\x00": ["a\x00b", ("c\x00",), 3, None], "n": 1.5}
    assert projectable(value) == {"k\ufffd": ["a\ufffdb", ("c\ufffd",), 3, None], "n": 1.5}
    assert projectable("plain") == "plain"


async def test_an_event_holding_nul_projects_and_the_projector_goes_on(
    store: Forgeline, database_url: str
) -> None:
    request_id, run_id = await in_thread(store_nul_events, store)
    # A later, ordinary request: the projector must get past the NUL events to show it.
    later, later_run = Request.submit(
        request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        spec=RequestSpec(repo="/srv/repo", prompt="echo fine"),
        command_id="cmd-later",
    )
    await in_thread(store.save, later, later_run)

    live = ProjectionRunner(store, database_url)
    async with running(live):
        await caught_up(database_url, LIVE_PREFIX)
    live.close()

    async with AsyncConnectionPool(database_url, min_size=1, open=False) as pool:
        views = Views(pool)
        view = await views.get_request(request_id)
        assert view is not None
        assert view["prompt"] == "echo a\ufffdb"
        assert view["repo"] == "/srv/re\ufffdpo"
        assert view["labels"] == {"project": "we\ufffdb"}
        assert view["status"] == "failed"
        run = await views.get_run(run_id)
        assert run is not None
        assert run["error"] == {"code": "agent_failed", "message": "exit 1: bad\ufffdbyte"}
        assert await views.get_run_diff(run_id) == NUL_DIFF.replace("\x00", "\ufffd")
        assert await views.get_request(later.id) is not None

    # The store keeps what was recorded.
    assert (await in_thread(store.get_request, request_id)).prompt == "echo a\x00b"

    # A bulk rebuild (COPY) gives the same rows as the live projector.
    live_rows = await in_thread(table_rows, database_url, LIVE_PREFIX)
    result = await in_thread(rebuild_and_swap, store, database_url)
    assert result.events > 0
    assert await in_thread(table_rows, database_url, LIVE_PREFIX) == live_rows
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT agent_options FROM forgeline_view_requests WHERE id = %s", (request_id,)
        ).fetchone()
    assert row is not None and row[0] == {"op\ufffdt": ["x\ufffd", {"k": "v\ufffd"}]}

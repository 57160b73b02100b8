"""A scenario that records every event type, and the golden event fixtures made from it.

`record_every_event_type` drives the domain through one request with three runs so that each
event class of Request and Run is recorded at least once. The golden fixtures in
tests/fixtures/events/ are stored-event rows (topic, originator id and version, and the state
the mapper wrote, as JSON) of that scenario, written once per event type and version and never
rewritten: they must keep loading, whatever the event classes become.

    python -m tests.event_scenario    # adds fixtures for event versions that have none yet
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.persistence import StoredEvent

from domain.application import Forgeline, aggregate_name, event_type
from domain.commands import RequestSpec
from domain.request import Request
from domain.run import Run
from domain.status import FailureCode

FIXTURES = Path(__file__).parent / "fixtures" / "events"
_NS = UUID("6f1d1c39-5b2a-4f43-9f3e-6a0f6a0c5e11")

DIFF = (
    "diff --git a/hello.txt b/hello.txt\nnew file mode 100644\nindex 0000000..ce01362\n"
    "--- /dev/null\n+++ b/hello.txt\n@@ -0,0 +1 @@\n+hello\n"
)
PATCH_STATS = {
    "sha256": hashlib.sha256(DIFF.encode()).hexdigest(),
    "bytes": len(DIFF.encode()),
    "files_changed": 1,
    "insertions": 1,
    "deletions": 0,
}


@dataclass
class Scenario:
    request: Request
    runs: list[Run]


def scenario_ids(tag: str = "golden") -> tuple[UUID, UUID, UUID, UUID]:
    """The request id and three run ids of a scenario (deterministic, per tag)."""
    request_id = uuid5(_NS, f"{tag}:request")
    return request_id, *(uuid5(_NS, f"{tag}:run:{n}") for n in (1, 2, 3))  # type: ignore[return-value]


def record_every_event_type(
    app: Forgeline, *, prompt: str = "echo hello > hello.txt", tag: str = "golden"
) -> Scenario:
    """One request and three runs: succeeded after a requeue, cancelled, failed."""
    request_id, run1_id, run2_id, run3_id = scenario_ids(tag)
    spec = RequestSpec(
        repo="/srv/repos/sample",
        ref="main",
        prompt=prompt,
        labels={"team": "core"},
        budget_usd=2.5,
        max_tokens=100_000,
    )
    request, run1 = Request.submit(
        request_id=request_id,
        run_id=run1_id,
        spec=spec,
        command_id=f"{tag}-cmd-1",
        idempotency_key=f"{tag}-key",
        submitted_by="alice",
    )
    app.save(request, run1)
    run1.start_provisioning("worker-a")
    run1.requeue("worker lost")
    run1.start_provisioning("worker-b")
    run1.record_workspace("local", "a" * 40)
    run1.start()
    run1.record_usage(
        provider="openai", model="gpt-4o", input_tokens=1200, output_tokens=80, cost_usd=0.0038
    )
    run1.record_patch(DIFF, PATCH_STATS)
    run1.succeed(0, log_lines=2, log_sha256="b" * 64)
    app.save(run1)

    run2 = request.rerun(
        run_id=run2_id,
        prompt="echo again",
        command_id=f"{tag}-cmd-2",
        latest=run1,
        requested_by="alice",
    )
    app.save(request, run2)
    run2.start_provisioning("worker-b")
    run2.record_workspace("local", "a" * 40)
    run2.start()
    run2.request_cancel("cancelled by client", f"{tag}-cmd-3", requested_by="bob")
    run2.cancel("cancelled by client", log_lines=1, log_sha256="c" * 64)
    app.save(run2)

    run3 = request.rerun(run_id=run3_id, prompt=None, command_id=f"{tag}-cmd-4", latest=run2)
    app.save(request, run3)
    run3.start_provisioning("worker-c")
    run3.fail(FailureCode.REPO_UNREACHABLE, "no such repository")
    app.save(run3)
    return Scenario(request, [run1, run2, run3])


# -- golden fixtures ------------------------------------------------------------------------


def stored_row(stored: StoredEvent) -> dict[str, Any]:
    return {
        "topic": stored.topic,
        "originator_id": str(stored.originator_id),
        "originator_version": stored.originator_version,
        "state": json.loads(stored.state),
    }


def stored_event(row: dict[str, Any]) -> StoredEvent:
    return StoredEvent(
        originator_id=UUID(row["originator_id"]),
        originator_version=int(row["originator_version"]),
        topic=row["topic"],
        state=json.dumps(row["state"], ensure_ascii=False).encode(),
    )


def fixture_name(event: Any) -> str:
    version = int(getattr(type(event), "class_version", 1))
    return f"{aggregate_name(event)}.{event_type(event)}.v{version}.json"


# The whole scenario's rows as first recorded (every event type at version 1): rebuilding the
# aggregates from it must keep giving the same states.
HISTORY = "history.json"


def write_missing(directory: Path = FIXTURES) -> list[Path]:
    """Writes a fixture for each event type and version that has none; never rewrites one."""
    app = Forgeline(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    scenario = record_every_event_type(app)
    ids = [scenario.request.id, *(run.id for run in scenario.runs)]
    rows = [
        stored_row(stored)
        for originator_id in ids
        for stored in app.recorder.select_events(originator_id)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    history = directory / HISTORY
    if not history.exists():
        history.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        written.append(history)
    for row in rows:
        event = app.mapper.to_domain_event(stored_event(row))
        path = directory / fixture_name(event)
        if not path.exists():
            path.write_text(json.dumps(row, indent=2, ensure_ascii=False) + "\n")
            written.append(path)
    return written


def main() -> int:
    for path in write_missing():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

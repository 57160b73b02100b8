"""Schema evolution: golden stored events of every type and version keep loading.

The rows in tests/fixtures/events/ were written by tests/event_scenario.py when each event
version was current, and are never rewritten. Each must load through the application's mapper
into an event object of the current class (older versions upcast), whose data matches the
current JSON Schema in docs/events/; the whole recorded history must rebuild the aggregates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from broker import envelope, schemas
from domain.application import Forgeline, aggregate_name, event_data, event_type
from domain.request import Request
from domain.run import Run
from domain.status import RunStatus
from tests.event_scenario import FIXTURES, HISTORY, scenario_ids, stored_event

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = sorted(p for p in FIXTURES.glob("*.json") if p.name != HISTORY)


def new_app() -> Forgeline:
    return Forgeline(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


def load(path: Path) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(path.read_text())
    return row


def current_schema(contract: schemas.EventContract) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((ROOT / schemas.EVENTS_DIR / contract.filename).read_text())
    return schema


CONTRACTS = {contract.key: contract for contract in schemas.event_contracts()}


def test_every_event_type_has_golden_fixtures_at_v1_and_at_its_current_version() -> None:
    names = {path.name for path in GOLDEN}
    for contract in CONTRACTS.values():
        assert f"{contract.key}.v1.json" in names, f"no v1 golden fixture of {contract.key}"
        assert f"{contract.key}.v{contract.version}.json" in names, (
            f"{contract.key} is at v{contract.version} but has no golden fixture of that version:"
            " run python -m tests.event_scenario"
        )


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden_event_loads_into_the_current_event_class(path: Path) -> None:
    key, _, _ = path.stem.rpartition(".")
    contract = CONTRACTS[key]

    event = new_app().mapper.to_domain_event(stored_event(load(path)))

    assert type(event) is contract.event_class
    assert f"{aggregate_name(event)}.{event_type(event)}" == key
    data = event_data(event)
    assert list(data) == [name for name, _, _ in schemas.data_fields(contract.event_class)]
    env = envelope.envelope(1, event)
    assert env["type"] == contract.type  # always the current version, whatever was stored
    jsonschema.Draft202012Validator(
        current_schema(contract), format_checker=jsonschema.FormatChecker()
    ).validate(env)


def test_the_recorded_history_rebuilds_the_aggregates() -> None:
    app = new_app()
    rows = json.loads((FIXTURES / HISTORY).read_text())
    app.recorder.insert_events([stored_event(row) for row in rows])
    request_id, *run_ids = scenario_ids()

    request = app.get_request(request_id)
    runs = [app.get_run(run_id) for run_id in run_ids]

    assert request.run_ids == run_ids
    assert request.prompt == "echo hello > hello.txt"
    assert request.labels == {"team": "core"}
    assert [run.status for run in runs] == [
        RunStatus.SUCCEEDED,
        RunStatus.CANCELLED,
        RunStatus.FAILED,
    ]
    assert runs[0].attempt == 2 and runs[0].has_patch
    assert runs[1].base_run_id == run_ids[0] and runs[1].prompt == "echo again"
    assert runs[2].error == {"code": "repo_unreachable", "message": "no such repository"}
    assert [run.number for run in runs] == [1, 2, 3]


def test_an_event_saved_now_loads_back_at_its_current_version() -> None:
    from tests.event_scenario import record_every_event_type

    app = new_app()
    scenario = record_every_event_type(app, tag="now")
    ids = [scenario.request.id, *(run.id for run in scenario.runs)]
    for originator_id in ids:
        for stored in app.recorder.select_events(originator_id):
            event = app.mapper.to_domain_event(stored)
            version = envelope.schema_version(type(event))
            state = json.loads(stored.state)
            assert state.get("class_version", 1) == version
    assert isinstance(app.repository.get(scenario.request.id), Request)
    assert isinstance(app.repository.get(scenario.runs[0].id), Run)


# -- the real evolution: RequestSubmitted v1 -> v2 (submitted_by) ---------------------------


def test_a_v1_request_submitted_loads_as_v2_with_submitted_by_none() -> None:
    row = load(FIXTURES / "Request.RequestSubmitted.v1.json")
    assert "class_version" not in row["state"] and "submitted_by" not in row["state"]

    event = new_app().mapper.to_domain_event(stored_event(row))

    assert isinstance(event, Request.RequestSubmitted)
    assert Request.RequestSubmitted.class_version == 2
    assert event.submitted_by is None
    assert event.prompt == "echo hello > hello.txt"
    assert envelope.envelope(7, event)["type"] == "forgeline.Request.RequestSubmitted.v2"
    assert envelope.envelope(7, event)["data"]["submitted_by"] is None


def test_a_v2_request_submitted_keeps_its_submitter() -> None:
    row = load(FIXTURES / "Request.RequestSubmitted.v2.json")
    assert row["state"]["class_version"] == 2

    event = new_app().mapper.to_domain_event(stored_event(row))

    assert isinstance(event, Request.RequestSubmitted)
    assert event.submitted_by == "alice"


def test_a_request_rebuilt_from_v1_events_has_no_submitter() -> None:
    app = new_app()
    rows = json.loads((FIXTURES / HISTORY).read_text())
    app.recorder.insert_events([stored_event(row) for row in rows])
    request_id, *_ = scenario_ids()

    assert app.get_request(request_id).submitted_by is None


def test_the_v1_schema_is_kept_and_describes_the_old_messages() -> None:
    v1 = json.loads(
        (ROOT / schemas.EVENTS_DIR / "forgeline.Request.RequestSubmitted.v1.json").read_text()
    )
    v2 = current_schema(CONTRACTS["Request.RequestSubmitted"])
    assert "submitted_by" not in v1["properties"]["data"]["properties"]
    assert "submitted_by" in v2["properties"]["data"]["required"]
    index = json.loads((ROOT / schemas.EVENTS_DIR / schemas.INDEX_FILE).read_text())
    (entry,) = [e for e in index["events"] if e["name"] == "RequestSubmitted"]
    assert entry["version"] == 2
    assert entry["superseded"] == [
        {"version": 1, "schema": "forgeline.Request.RequestSubmitted.v1.json"}
    ]

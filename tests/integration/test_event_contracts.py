"""Event contracts: checked-in JSON Schemas and AsyncAPI document are current and hold.

- docs/events/ and docs/asyncapi.json equal what broker/schemas.py generates now;
- every envelope the relay publishes for a scenario recording every event type (real Postgres,
  real JetStream) validates against the checked-in schema of its `type`;
- the AsyncAPI document is a well-formed AsyncAPI 3.0 document whose references resolve and
  whose channels are the subjects Forgeline uses;
- the example envelope in docs/events.md validates too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
from nats.js import JetStreamContext

from broker import schemas, subjects
from broker.relay import Relay
from domain.application import Forgeline
from tests.event_scenario import record_every_event_type
from tests.integration.conftest import in_thread

ROOT = Path(__file__).resolve().parents[2]


def schema_of(event_type: str, root: Path = ROOT) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(
        (root / schemas.EVENTS_DIR / f"{event_type}.json").read_text()
    )
    return schema


def validate(env: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(
        schema_of(env["type"]), format_checker=jsonschema.FormatChecker()
    )
    validator.validate(env)


def test_checked_in_schemas_and_asyncapi_are_current() -> None:
    stale = schemas.stale_files(ROOT)
    assert not stale, f"stale contract files {stale}: run python -m broker.schemas --write"
    index = json.loads((ROOT / schemas.EVENTS_DIR / schemas.INDEX_FILE).read_text())
    for entry in index["events"]:
        for file in [entry["schema"], *(old["schema"] for old in entry["superseded"])]:
            jsonschema.Draft202012Validator.check_schema(
                json.loads((ROOT / schemas.EVENTS_DIR / file).read_text())
            )


def test_the_command_finds_a_stale_file_and_write_restores_it(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    shutil.copytree(ROOT / schemas.EVENTS_DIR, tmp_path / schemas.EVENTS_DIR)
    shutil.copy(ROOT / schemas.ASYNCAPI_FILE, tmp_path / schemas.ASYNCAPI_FILE)
    command = [sys.executable, "-m", "broker.schemas", "--root", str(tmp_path)]
    assert subprocess.run([*command, "--check"], cwd=ROOT).returncode == 0

    run_started = tmp_path / schemas.EVENTS_DIR / "forgeline.Run.RunStarted.v1.json"
    run_started.write_text("{}\n")
    (tmp_path / schemas.ASYNCAPI_FILE).unlink()
    check = subprocess.run([*command, "--check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 1
    assert "forgeline.Run.RunStarted.v1.json" in check.stderr
    assert "asyncapi.json" in check.stderr

    assert subprocess.run([*command, "--write"], cwd=ROOT, capture_output=True).returncode == 0
    assert schemas.stale_files(tmp_path) == []
    assert run_started.read_text() == (ROOT / schemas.EVENTS_DIR / run_started.name).read_text()
    kept = "forgeline.Request.RequestSubmitted.v1.json"  # an older version: kept as it was
    assert (tmp_path / schemas.EVENTS_DIR / kept).read_text() == (
        ROOT / schemas.EVENTS_DIR / kept
    ).read_text()


async def test_every_envelope_the_relay_publishes_matches_its_schema(
    store: Forgeline, js: JetStreamContext
) -> None:
    await in_thread(record_every_event_type, store)
    relay = Relay(store, js)
    while await relay.publish_batch():
        pass

    last_seq = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq or 0
    seen = set()
    for seq in range(1, last_seq + 1):
        msg = await js.get_msg(subjects.EVENTS_STREAM, seq=seq)
        env = json.loads(msg.data or b"{}")
        validate(env)
        _, aggregate, name, version = env["type"].split(".")
        assert msg.subject == subjects.event_subject(aggregate, name)
        seen.add(f"{aggregate}.{name}")
        contract = next(c for c in schemas.event_contracts() if c.key == f"{aggregate}.{name}")
        assert version == f"v{contract.version}"
    assert seen == {contract.key for contract in schemas.event_contracts()}


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are expected, got {ref}"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolved reference {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_the_asyncapi_document_is_well_formed() -> None:
    from faststream.specification.asyncapi.v3_0_0.schema import ApplicationSchema

    document = json.loads((ROOT / schemas.ASYNCAPI_FILE).read_text())
    # The AsyncAPI 3.0 object model as faststream has it (its Server wants a pathname, which
    # the spec makes optional: servers are checked here instead).
    ApplicationSchema.model_validate({k: v for k, v in document.items() if k != "servers"})
    for server in document["servers"].values():
        assert server["host"] and server["protocol"] == "nats"
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] and document["info"]["version"]
    name = re.compile(r"^[A-Za-z0-9_.\-]+$")  # component and channel keys, per the spec
    for ref in _refs(document):
        _resolve(document, ref)
    for key in [*document["channels"], *document["operations"]]:
        assert name.match(key), key
    for section in document["components"].values():
        for key in section:
            assert name.match(key), key

    for op_id, operation in document["operations"].items():
        assert operation["action"] in ("send", "receive"), op_id
        channel_ref = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), op_id
        channel = _resolve(document, channel_ref)
        for message in channel["messages"].values():
            resolved = _resolve(document, message["$ref"])
            assert "payload" in resolved and "$ref" in resolved["payload"]

    addresses = {
        channel["address"]: (op["action"], channel)
        for op in document["operations"].values()
        for channel in [_resolve(document, op["channel"]["$ref"])]
    }
    for kind in ("submit", "rerun", "cancel"):
        assert addresses[subjects.command_subject(kind)][0] == "receive"
    assert addresses[subjects.log_subject("{run_id}")][0] == "send"
    for contract in schemas.event_contracts():
        action, channel = addresses[contract.subject]
        assert action == "send"
        (message_ref,) = [m["$ref"] for m in channel["messages"].values()]
        payload = _resolve(document, _resolve(document, message_ref)["payload"]["$ref"])
        expected = {
            k: v for k, v in schema_of(contract.type).items() if k not in ("$schema", "$id")
        }
        assert payload == expected
    for address in addresses:
        assert address.startswith(("forgeline.cmd.", "forgeline.evt.", "forgeline.log."))


def test_the_example_in_docs_events_md_validates() -> None:
    text = (ROOT / "docs" / "events.md").read_text()
    examples = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    assert examples, "docs/events.md shows no JSON example"
    validate(json.loads(examples[0]))

"""Event contracts for other systems: a JSON Schema per event type and an AsyncAPI 3.0 document.

Everything here is generated from code: the event classes of the aggregates (their annotations
and class_version), the command models, the subjects and the envelope. The output is checked in
(docs/events/ and docs/asyncapi.json) and a test fails when it differs from what this module
generates. After changing an event class:

    python -m broker.schemas --write     # regenerate docs/events/ and docs/asyncapi.json
    python -m broker.schemas --check     # exit 1 when the checked-in files are stale

Bumping an event class's `class_version` (with an `upcast_vN_vN+1` on the class) adds a schema
file for the new version; the file of the old version is kept, not regenerated: it describes
the messages published before the change, which FORGELINE_EVENTS may still hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from eventsourcing.domain import Aggregate
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

from broker import envelope, subjects
from broker.logs import MAX_LINE_CHARS
from domain.commands import CancelRequest, RerunRequest, SubmitRequest
from domain.request import Request
from domain.run import Run

AGGREGATES: tuple[type[Aggregate], ...] = (Request, Run)
EVENTS_DIR = Path("docs") / "events"
ASYNCAPI_FILE = Path("docs") / "asyncapi.json"
INDEX_FILE = "index.json"
README_FILE = "README.md"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# The version of the broker contract as a whole (AsyncAPI info.version).
CONTRACT_VERSION = "1.0.0"

# Attributes every event has that travel in the envelope, not in `data`
# (the same as domain.application.event_data leaves out).
ENVELOPE_ATTRIBUTES = frozenset(
    {"originator_id", "originator_version", "timestamp", "originator_topic"}
)

DESCRIPTIONS: dict[str, str] = {
    "Request.RequestSubmitted": "A client asked for a change: repository, ref, prompt and agent. "
    "The request's first run is queued in the same transaction (first_run_id).",
    "Request.RerunRequested": "A new run was asked for on top of the latest patch, with an "
    "optional follow-up prompt.",
    "Run.RunQueued": "A run was created and waits for a worker; base_run_id names the run whose "
    "patch it starts from (reruns).",
    "Run.ProvisioningStarted": "A worker claimed the run (attempt counts from 1) and is "
    "preparing its workspace.",
    "Run.WorkspaceProvisioned": "The workspace exists, checked out at base_commit.",
    "Run.RunStarted": "The agent started in the workspace.",
    "Run.PatchProduced": "The run's cumulative patch against the request's base commit.",
    "Run.RunSucceeded": "The agent exited 0 (terminal).",
    "Run.RunFailed": "The run failed (terminal); code is one of agent_failed, timeout, "
    "repo_unreachable, workspace_failed, patch_too_large, worker_lost.",
    "Run.CancelRequested": "A client asked to cancel the run; the worker holding it stops the "
    "agent and records RunCancelled.",
    "Run.RunCancelled": "The run was cancelled (terminal).",
    "Run.RunRequeued": "The worker holding the run was lost or shut down; the run waits for "
    "another attempt.",
}

FIELD_DESCRIPTIONS: dict[str, str] = {
    "Run.PatchProduced.diff": "The patch (git diff --binary, untracked files included); null "
    f"when larger than {envelope.MAX_INLINE_DIFF_BYTES} bytes, then diff_omitted is true and "
    "the patch is at GET /v1/runs/{id}/patch.",
    "Request.RequestSubmitted.submitted_by": "Who submitted the request (the API key's owner), "
    "when known; null for requests recorded before version 2.",
}

_SCHEMA_FILE = re.compile(
    r"^forgeline\.(?P<aggregate>\w+)\.(?P<name>\w+)\.v(?P<version>\d+)\.json$"
)


@dataclass(frozen=True)
class EventContract:
    """One event type as subscribers see it."""

    event_class: type[Any]
    aggregate: str
    name: str

    @property
    def version(self) -> int:
        return envelope.schema_version(self.event_class)

    @property
    def key(self) -> str:
        return f"{self.aggregate}.{self.name}"

    @property
    def type(self) -> str:
        return envelope.cloudevent_type(self.aggregate, self.name, self.version)

    @property
    def subject(self) -> str:
        return subjects.event_subject(self.aggregate, self.name)

    @property
    def filename(self) -> str:
        return f"{self.type}.json"


def event_contracts() -> list[EventContract]:
    """Every event class of every aggregate, in declaration order."""
    contracts = []
    for aggregate in AGGREGATES:
        for name, value in vars(aggregate).items():
            if (
                isinstance(value, type)
                and issubclass(value, Aggregate.Event)
                and name not in ("Event", "Created")
            ):
                contracts.append(EventContract(value, aggregate.__name__, name))
    return contracts


def data_fields(event_class: type[Any]) -> list[tuple[str, Any, Any]]:
    """(name, annotation, default or ...) of the attributes an event carries in `data`."""
    hints = typing.get_type_hints(event_class)
    fields = []
    for field in dataclasses.fields(event_class):
        if field.name in ENVELOPE_ATTRIBUTES:
            continue
        default = field.default if field.default is not dataclasses.MISSING else ...
        fields.append((field.name, hints[field.name], default))
    return fields


def data_model(contract: EventContract) -> type[BaseModel]:
    """A pydantic model of the event's `data` as the envelope carries it."""
    definitions: dict[str, Any] = {}
    for name, annotation, default in data_fields(contract.event_class):
        description = FIELD_DESCRIPTIONS.get(f"{contract.key}.{name}")
        if name == "diff":  # see broker.envelope: a large patch is left out of the envelope
            annotation = annotation | None
        definitions[name] = (annotation, Field(default, description=description))
    if "diff" in definitions:
        definitions["diff_omitted"] = (
            bool,
            Field(False, description="Present and true when the patch was left out (diff null)."),
        )
    model: type[BaseModel] = create_model(
        contract.name,
        __config__=ConfigDict(extra="forbid"),
        **definitions,
    )
    return model


def data_schema(contract: EventContract) -> dict[str, Any]:
    schema = data_model(contract).model_json_schema()
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    # Fields with a default are optional for old producers, yet always present in envelopes
    # (the relay upcasts stored events): subscribers may rely on every field being there.
    schema["required"] = [name for name in schema.get("properties", {}) if name != "diff_omitted"]
    if not schema["required"]:
        del schema["required"]
    return schema


def event_schema(contract: EventContract) -> dict[str, Any]:
    """The JSON Schema of a whole CloudEvents envelope of this event type."""
    data = data_schema(contract)
    defs = data.pop("$defs", None)
    uuid_string = {"type": "string", "format": "uuid"}
    schema: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"urn:forgeline:event:{contract.type}",
        "title": contract.type,
        "description": DESCRIPTIONS.get(contract.key, ""),
        "type": "object",
        "properties": {
            "specversion": {"const": envelope.SPECVERSION},
            "id": {"type": "string", "description": "The store position, as a string."},
            "source": {"const": envelope.SOURCE},
            "type": {"const": contract.type},
            "subject": {**uuid_string, "description": "The aggregate's id."},
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"const": envelope.DATACONTENTTYPE},
            "position": {
                "type": "integer",
                "minimum": 1,
                "description": "Global store position (increasing, may have gaps); also the "
                "message's Nats-Msg-Id.",
            },
            "aggregate": {"const": contract.aggregate},
            "aggregateid": uuid_string,
            "version": {
                "type": "integer",
                "minimum": 1,
                "description": "The aggregate's version after this event (1 for its first).",
            },
            "data": data,
        },
        "required": [
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "time",
            "datacontenttype",
            "position",
            "aggregate",
            "aggregateid",
            "version",
            "data",
        ],
    }
    if defs:
        schema["$defs"] = defs
    return schema


# -- the index, kept older versions ------------------------------------------------------


def superseded_files(events_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """Schema files of older versions, kept as they were: key -> [(version, filename)]."""
    current = {contract.key: contract.version for contract in event_contracts()}
    kept: dict[str, list[tuple[int, str]]] = {}
    if not events_dir.is_dir():
        return kept
    for path in sorted(events_dir.iterdir()):
        match = _SCHEMA_FILE.match(path.name)
        if not match:
            continue
        key = f"{match['aggregate']}.{match['name']}"
        version = int(match["version"])
        if key in current and version < current[key]:
            kept.setdefault(key, []).append((version, path.name))
    return kept


def index(events_dir: Path) -> dict[str, Any]:
    kept = superseded_files(events_dir)
    return {
        "specversion": envelope.SPECVERSION,
        "source": envelope.SOURCE,
        "stream": subjects.EVENTS_STREAM,
        "events": [
            {
                "type": contract.type,
                "aggregate": contract.aggregate,
                "name": contract.name,
                "version": contract.version,
                "subject": contract.subject,
                "schema": contract.filename,
                "description": DESCRIPTIONS.get(contract.key, ""),
                "superseded": [
                    {"version": version, "schema": filename}
                    for version, filename in kept.get(contract.key, [])
                ],
            }
            for contract in event_contracts()
        ],
    }


def readme(events_dir: Path) -> str:
    lines = [
        "# Event schemas",
        "",
        "Generated by `python -m broker.schemas --write`; do not edit by hand. One JSON Schema",
        "(draft 2020-12) per event type and version, describing the whole CloudEvents envelope",
        f"published on `{subjects.EVENTS_STREAM}`. See [../events.md](../events.md).",
        "",
        "| type | subject | data fields | older versions |",
        "| --- | --- | --- | --- |",
    ]
    kept = superseded_files(events_dir)
    for contract in event_contracts():
        fields = ", ".join(f"`{name}`" for name, _, _ in data_fields(contract.event_class))
        older = ", ".join(f"[v{v}]({filename})" for v, filename in kept.get(contract.key, []))
        lines.append(
            f"| [`{contract.type}`]({contract.filename}) | `{contract.subject}` "
            f"| {fields or '(none)'} | {older} |"
        )
    return "\n".join(lines) + "\n"


# -- AsyncAPI --------------------------------------------------------------------------------


class LogLine(BaseModel):
    """One line of a run's output (subject forgeline.log.<run_id>)."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=1, description="Line number within the attempt, from 1.")
    stream: Literal["stdout", "stderr", "system"]
    line: str = Field(max_length=MAX_LINE_CHARS)
    ts: datetime


_COMMANDS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("submit", SubmitRequest),
    ("rerun", RerunRequest),
    ("cancel", CancelRequest),
)


def _header_schema(description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"Nats-Msg-Id": {"type": "string", "description": description}},
        "required": ["Nats-Msg-Id"],
    }


def _for_asyncapi(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy without the keywords that only make sense in a standalone file."""
    return {k: v for k, v in schema.items() if k not in ("$schema", "$id")}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the broker, from Forgeline's point of view."""
    ref_template = "#/components/schemas/{model}"
    _, defs = models_json_schema(
        [(model, "validation") for _, model in _COMMANDS] + [(LogLine, "serialization")],
        ref_template=ref_template,
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    def add(
        channel_id: str,
        channel: dict[str, Any],
        message_id: str,
        message: dict[str, Any],
        action: str,
        summary: str,
    ) -> None:
        messages[message_id] = message
        channel["messages"] = {message_id: {"$ref": f"#/components/messages/{message_id}"}}
        channels[channel_id] = channel
        operations[f"{action}{channel_id[0].upper()}{channel_id[1:]}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{message_id}"}],
        }

    for kind, model in _COMMANDS:
        add(
            f"command_{kind}",
            {
                "address": subjects.command_subject(kind),
                "title": f"{kind} command",
                "description": f"Stream {subjects.COMMANDS_STREAM} (work queue); consumed by "
                f"the durable consumer {subjects.COMMAND_HANDLER_DURABLE!r}, acked after the "
                "event store commit.",
            },
            model.__name__,
            {
                "name": model.__name__,
                "title": model.__name__,
                "contentType": "application/json",
                "headers": _header_schema("The command id: JetStream drops a duplicate."),
                "payload": {"$ref": ref_template.format(model=model.__name__)},
            },
            "receive",
            f"The gateway publishes a {kind} command; a worker handles it.",
        )

    for contract in event_contracts():
        schemas[contract.type] = _for_asyncapi(event_schema(contract))
        add(
            f"event_{contract.aggregate}_{contract.name}",
            {
                "address": contract.subject,
                "title": contract.name,
                "description": f"Stream {subjects.EVENTS_STREAM}: every stored "
                f"{contract.name} event, in store order. Older versions of the message may "
                "remain in the stream; their schemas are in docs/events/.",
            },
            contract.type,
            {
                "name": contract.type,
                "title": contract.name,
                "summary": DESCRIPTIONS.get(contract.key, ""),
                "contentType": "application/cloudevents+json",
                "headers": _header_schema("The store position: JetStream drops a duplicate."),
                "payload": {"$ref": ref_template.format(model=contract.type)},
            },
            "send",
            f"The relay publishes every stored {contract.name} event.",
        )

    add(
        "run_log",
        {
            "address": subjects.log_subject("{run_id}"),
            "title": "run output",
            "description": f"Stream {subjects.LOGS_STREAM} (kept 14 days by default): one "
            "message per output line of a run, in order; not domain state (the run's terminal "
            "event records the count and sha256 of the lines).",
            "parameters": {"run_id": {"description": "The run's id (a UUID)."}},
        },
        "LogLine",
        {
            "name": "LogLine",
            "title": "LogLine",
            "contentType": "application/json",
            "headers": _header_schema("<run_id>:<attempt>:<seq>"),
            "payload": {"$ref": ref_template.format(model="LogLine")},
        },
        "send",
        "The worker running a run publishes each line of its output.",
    )

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Forgeline broker",
            "version": CONTRACT_VERSION,
            "description": "Commands into Forgeline, events and run output out of it, on NATS "
            "JetStream. Events are CloudEvents 1.0 JSON envelopes whose type carries the "
            "event's schema version (forgeline.<Aggregate>.<EventType>.v<N>).",
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The deployment's NATS server (FORGELINE_NATS_URL); `forgeline "
                "up` starts an embedded one.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


# -- files -----------------------------------------------------------------------------------


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def generated_files(root: Path) -> dict[Path, str]:
    """Relative path -> content of every generated file (older versions' schemas excluded)."""
    events_dir = root / EVENTS_DIR
    files = {EVENTS_DIR / c.filename: _dump(event_schema(c)) for c in event_contracts()}
    files[EVENTS_DIR / INDEX_FILE] = _dump(index(events_dir))
    files[EVENTS_DIR / README_FILE] = readme(events_dir)
    files[ASYNCAPI_FILE] = _dump(asyncapi())
    return files


def stale_files(root: Path) -> list[Path]:
    """Generated files that are missing or differ from what is checked in under root."""
    stale = []
    for path, content in generated_files(root).items():
        target = root / path
        if not target.is_file() or target.read_text() != content:
            stale.append(path)
    return stale


def write(root: Path) -> list[Path]:
    """Writes the files that changed; returns them."""
    (root / EVENTS_DIR).mkdir(parents=True, exist_ok=True)
    stale = stale_files(root)
    for path, content in generated_files(root).items():
        if path in stale:
            (root / path).write_text(content)
    # The index and README list the kept files of older versions; written once more now that
    # new versions' files exist.
    for path, content in generated_files(root).items():
        if (root / path).read_text() != content:
            (root / path).write_text(content)
    return stale


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.schemas", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="regenerate the files")
    mode.add_argument("--check", action="store_true", help="fail when a file is stale (default)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.write:
        for path in write(args.root):
            print(f"wrote {path}")
        return 0
    stale = stale_files(args.root)
    for path in stale:
        print(f"stale: {path} (run python -m broker.schemas --write)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

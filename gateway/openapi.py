"""API documentation: /openapi.json (OpenAPI 3.1), /docs (a page rendering it), /asyncapi.json.

The document is generated from the routes the application really serves (`request.app.routes`,
so nothing can be served undocumented) and from pydantic models: the command bodies of domain/
(RequestSpec, RerunSpec), KeySpec, and the response shapes below, which mirror what
projections/views.py, projections/audit.py and gateway/keys.py return. Each route's auth comes
from the role `requires()` put on its endpoint (`required_role`): those routes carry the
`bearerAuth` security scheme and the 401/403/429/503 answers; the others are public.

The three documentation routes need no key: the contract is no secret, and clients (and tools
such as schemathesis) read it before they have one.
"""

from __future__ import annotations

import html
import json
import re
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from domain.agents import AGENTS, DEFAULT_AGENT
from domain.commands import MAX_LABELS, RequestSpec, RerunSpec
from domain.status import REQUEST_STATUSES, RunStatus
from gateway.errors import ApiError
from gateway.keys import KeySpec, Role

API_VERSION = "1.0.0"
ASYNCAPI_FILE = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"

RunStatusName = Literal["queued", "provisioning", "running", "succeeded", "failed", "cancelled"]
RequestStatusName = Literal[
    "queued", "provisioning", "running", "patch_ready", "failed", "cancelled"
]
assert set(RunStatusName.__args__) == {s.value for s in RunStatus}  # type: ignore[attr-defined]
assert set(RequestStatusName.__args__) == set(REQUEST_STATUSES)  # type: ignore[attr-defined]


# -- response shapes ------------------------------------------------------------------------


class _Shape(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorDetail(_Shape):
    code: str = Field(description="machine-readable, e.g. not_found, validation_failed")
    message: str = Field(description="for people")
    details: list[Any] = Field(description="e.g. the fields that failed validation")


class Error(_Shape):
    """Every error answer."""

    error: ErrorDetail


class Accepted(_Shape):
    """202 of POST /v1/requests."""

    request_id: UUID
    run_id: UUID
    status_url: str


class RunAccepted(_Shape):
    """202 of rerun and cancel: the request and the run concerned."""

    request_id: UUID
    run_id: UUID


class RunErrorInfo(_Shape):
    code: str
    message: str


class PatchStats(_Shape):
    files_changed: int
    insertions: int
    deletions: int
    bytes: int
    sha256: str


class Usage(_Shape):
    """The run's model usage through the LLM proxy, totals over its calls (every attempt);
    null for a run that made no model call (e.g. a shell run)."""

    input_tokens: int
    output_tokens: int
    cost_usd: float


class RunView(_Shape):
    id: UUID
    request_id: UUID
    number: int
    status: RunStatusName
    agent: str
    attempt: int
    exit_code: int | None
    error: RunErrorInfo | None
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    patch: PatchStats | None
    usage: Usage | None
    queue_position: int | None = Field(
        default=None,
        description="queued runs: 1 = the next to start (priority, then round robin by the"
        " project label, then queue order); null otherwise. Only in GET /v1/runs/{id}",
    )


class RequestView(_Shape):
    id: UUID
    status: RequestStatusName
    repo: str
    ref: str | None
    prompt: str
    agent: str
    priority: int
    labels: dict[str, str]
    created_at: datetime
    updated_at: datetime
    latest_run_id: UUID
    runs: list[RunView] = Field(description="oldest first; empty in lists")


class RequestList(_Shape):
    items: list[RequestView] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null: end")


class StoredEvent(_Shape):
    position: int = Field(description="the event's position in the store (commit order)")
    aggregate: str
    aggregate_id: UUID
    version: int
    type: str
    timestamp: datetime
    data: dict[str, Any]


class EventList(_Shape):
    events: list[StoredEvent]


class DeadLetter(_Shape):
    id: int = Field(description="its sequence in FORGELINE_DEAD_LETTERS")
    reason: str = Field(description="why the consumer gave up on it")
    stream: str | None
    consumer: str | None
    subject: str | None
    sequence: int | None = Field(description="its sequence in the stream it came from")
    deliveries: int | None = Field(description="how many times it was delivered")
    dead_lettered_at: datetime | None
    payload: str = Field(description="the message as text, at most 4096 characters")
    payload_truncated: bool


class DeadLetterList(_Shape):
    items: list[DeadLetter] = Field(description="newest first")
    total: int = Field(description="dead letters kept (30 days)")


class ApiKeyView(_Shape):
    id: str
    name: str
    role: Role
    projects: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyView):
    key: str = Field(description="the secret: shown this once, never again")


class ApiKeyList(_Shape):
    items: list[ApiKeyView]


class AgentView(_Shape):
    name: str
    description: str
    needs_llm: bool = Field(description="it calls a model, through the LLM proxy")
    options_schema: dict[str, Any] = Field(description="JSON Schema of its agent_options")


class AgentList(_Shape):
    agents: list[AgentView]


class Health(_Shape):
    status: Literal["ok"]


class Readiness(_Shape):
    ready: bool
    checks: dict[str, bool]


_MODELS: list[type[BaseModel]] = [
    RequestSpec,
    RerunSpec,
    KeySpec,
    Error,
    Accepted,
    RunAccepted,
    RunView,
    RequestView,
    RequestList,
    EventList,
    DeadLetterList,
    ApiKeyView,
    ApiKeyCreated,
    ApiKeyList,
    AgentList,
    Health,
    Readiness,
]


# -- operations ------------------------------------------------------------------------------

_JSON = "application/json"


def _ref(model: type[BaseModel] | str) -> dict[str, Any]:
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": f"#/components/schemas/{name}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(model)}}}


def _error(description: str) -> dict[str, Any]:
    return _json(Error, description)


_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "a UUID; anything else answers 404",
}
_KEY_ID_PARAM = {**_ID_PARAM, "description": "the key's id (key_...)"}


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    body: type[BaseModel] | None = None,
    body_required: bool = True,
    params: list[dict[str, Any]] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if description:
        operation["description"] = description
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = {
            "required": body_required,
            "content": {_JSON: {"schema": _ref(body)}},
        }
    return operation


_BAD_BODY = {
    "400": _error("the body is not a JSON object"),
    "413": _error("the body is larger than the limit (FORGELINE_MAX_BODY_BYTES)"),
    "422": _error("the body breaks the rules: details name the fields"),
}
_NOT_FOUND = {"404": _error("no such resource (or one of a project the key may not see)")}

# (method, path) -> operation; every route the application serves must be here (or is
# documented as a generic page, see _generic), the test checks it.
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/requests"): _op(
        "Submit a request: a prompt for an agent against a repository",
        {
            "202": _json(Accepted, "accepted: stored in the command stream, runs soon"),
            **_BAD_BODY,
            "400": _error("the body is not a JSON object, or the Idempotency-Key is too long"),
            "409": _error("this Idempotency-Key was used for a different request"),
        },
        body=RequestSpec,
        params=[
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                "description": "the same key gives the same request, forever",
            }
        ],
        description="`repo` is a git URL, a file:// URL or an absolute path. With the operator "
        "role; a key limited to projects must set `labels.project` to one of them (else 403).",
    ),
    ("GET", "/v1/requests"): _op(
        "List requests, newest first",
        {
            "200": _json(RequestList, "a page of requests"),
            "400": _error("a query parameter is invalid"),
        },
        params=[
            {
                "name": "status",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": list(REQUEST_STATUSES)},
            },
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
            },
            {
                "name": "cursor",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "next_cursor of the previous page",
            },
        ],
    ),
    ("GET", "/v1/requests/{id}"): _op(
        "A request with all its runs",
        {"200": _json(RequestView, "the request"), **_NOT_FOUND},
        params=[_ID_PARAM],
        description="A request accepted but not yet projected may answer 404 briefly.",
    ),
    ("GET", "/v1/requests/{id}/events"): _op(
        "The request's and its runs' events, in commit order, from the event store",
        {"200": _json(EventList, "the history"), **_NOT_FOUND},
        params=[_ID_PARAM],
    ),
    ("POST", "/v1/requests/{id}/rerun"): _op(
        "A new run on top of the latest patch, with an optional follow-up prompt",
        {
            "202": _json(RunAccepted, "accepted"),
            **_BAD_BODY,
            **_NOT_FOUND,
            "409": _error("a run of this request is still active"),
        },
        body=RerunSpec,
        body_required=False,
    ),
    ("POST", "/v1/requests/{id}/cancel"): _op(
        "Cancel the active run (agent stopped, workspace released)",
        {
            "202": _json(RunAccepted, "accepted: the run named is being cancelled"),
            **_NOT_FOUND,
            "409": _error("nothing is active"),
        },
        params=[_ID_PARAM],
    ),
    ("GET", "/v1/runs/{id}"): _op(
        "A run", {"200": _json(RunView, "the run"), **_NOT_FOUND}, params=[_ID_PARAM]
    ),
    ("GET", "/v1/runs/{id}/patch"): _op(
        "The run's patch: a git diff that `git apply` applies to the request's base commit",
        {
            "200": {
                "description": "the diff (cumulative over the request's runs)",
                "content": {"text/x-diff": {"schema": {"type": "string"}}},
            },
            "404": _error("no such run, or no patch (yet)"),
        },
        params=[_ID_PARAM],
    ),
    ("GET", "/v1/runs/{id}/logs"): _op(
        "The run's output as server-sent events",
        {
            "200": {
                "description": "`event: log` with data `{seq, stream, line, ts}` from the first "
                "line, then live; a final `event: end` with `{status}` once the run is terminal",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **_NOT_FOUND,
        },
        params=[
            _ID_PARAM,
            {
                "name": "follow",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["0", "1", "false", "true", "no", "yes"]},
                "description": "0: send what exists and end",
            },
        ],
    ),
    ("GET", "/v1/whoami"): _op("The calling key", {"200": _json(ApiKeyView, "the key")}),
    ("GET", "/v1/agents"): _op(
        "The agents a request may name, with the JSON Schema of their agent_options",
        {"200": _json(AgentList, "the catalogue")},
    ),
    ("GET", "/v1/keys"): _op(
        "Every API key, revoked ones included (admin)",
        {"200": _json(ApiKeyList, "the keys, oldest first")},
    ),
    ("POST", "/v1/keys"): _op(
        "Create an API key (admin)",
        {"201": _json(ApiKeyCreated, "the key and its secret, shown this once"), **_BAD_BODY},
        body=KeySpec,
    ),
    ("POST", "/v1/keys/{id}/revoke"): _op(
        "Revoke an API key (admin): at once here, within the key cache TTL (2 s) elsewhere",
        {"200": _json(ApiKeyView, "the key, revoked"), **_NOT_FOUND},
        params=[_KEY_ID_PARAM],
    ),
    ("GET", "/healthz"): _op("Liveness (no key)", {"200": _json(Health, "the process is alive")}),
    ("GET", "/readyz"): _op(
        "Readiness (no key): NATS and Postgres reachable",
        {"200": _json(Readiness, "ready"), "503": _json(Readiness, "not ready")},
    ),
    ("GET", "/v1/dead-letters"): _op(
        "Messages given up on (dead letters), newest first; an operator key not limited to"
        " projects",
        {
            "200": _json(DeadLetterList, "the newest dead letters"),
            "400": _error("a query parameter is invalid"),
        },
        params=[
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            }
        ],
    ),
    ("GET", "/metrics"): _op(
        "Prometheus metrics (docs/observability.md); a key not limited to projects",
        {
            "200": {
                "description": "Prometheus text format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            "503": _error("the store does not answer"),
        },
    ),
    ("GET", "/openapi.json"): _op(
        "This document (no key)",
        {
            "200": {
                "description": "OpenAPI 3.1",
                "content": {_JSON: {"schema": {"type": "object"}}},
            }
        },
    ),
    ("GET", "/asyncapi.json"): _op(
        "The AsyncAPI document of the broker's streams (no key)",
        {
            "200": {
                "description": "AsyncAPI",
                "content": {_JSON: {"schema": {"type": "object"}}},
            }
        },
    ),
    ("GET", "/docs"): _op(
        "This documentation as a page (no key)",
        {
            "200": {
                "description": "HTML",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    ),
}

_AUTH_ERRORS = {
    "401": _error("no API key, or an unknown or revoked one"),
    "403": _error("the key's role is too low (or it is limited to projects)"),
    "429": {
        **_error("the key's rate limit is reached"),
        "headers": {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
    },
    "503": _error("the store or the broker does not answer; retry later"),
}


def _generic(method: str, path: str, route: Route) -> dict[str, Any]:
    """A route without an entry above (e.g. a page of the web UI): documented loosely."""
    doc = (route.endpoint.__doc__ or "").strip().splitlines()
    return _op(
        doc[0] if doc else f"{method} {path}",
        {"200": {"description": "a page or asset", "content": {"*/*": {"schema": {}}}}},
    )


_CONVERTER = re.compile(r"\{(\w+):\w+\}")


def _path_params(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"\{(\w+)\}", path)
    ]


@cache
def _schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(model, "validation") for model in _MODELS],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    # What the validators of domain/commands.py and gateway/keys.py check beyond the types,
    # told to clients in the schema too (the same regular expressions, Python's dialect).
    spec = schemas["RequestSpec"]["properties"]
    spec["repo"]["pattern"] = _REPO_PATTERN
    _string_branch(spec["ref"])["pattern"] = _REF_PATTERN
    spec["prompt"]["pattern"] = _NOT_BLANK
    spec["agent"]["enum"] = sorted(AGENTS)
    # agent_options follow the schema of the agent named (shell when none is).
    schemas["RequestSpec"]["allOf"] = [
        {
            "if": {"properties": {"agent": {"const": agent.name}}, "required": ["agent"]},
            "then": {"properties": {"agent_options": agent.options_schema}},
        }
        for agent in AGENTS.values()
    ] + [
        {
            "if": {"not": {"required": ["agent"]}},
            "then": {"properties": {"agent_options": AGENTS[DEFAULT_AGENT].options_schema}},
        }
    ]
    spec["labels"]["maxProperties"] = MAX_LABELS
    spec["labels"]["propertyNames"] = {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$"}
    _string_branch(schemas["RerunSpec"]["properties"]["prompt"])["pattern"] = _NOT_BLANK
    key_spec = schemas["KeySpec"]
    key_spec["properties"]["projects"]["items"]["pattern"] = r"^[^\s,][^,]{0,255}$"
    key_spec["if"] = {"properties": {"role": {"const": "admin"}}, "required": ["role"]}
    key_spec["then"] = {"properties": {"projects": {"maxItems": 0}}}  # admins see every project
    return schemas


# domain/commands.py: the value stripped, then a git URL, a file:// URL or an absolute path.
_REPO_PATTERN = (
    r"^\s*(?:file:///[\s\S]*|/[\s\S]*|(?:https?|ssh|git)://[^\s/]+(?:/\S*)?"
    r"|[\w.-]+@[\w.-]+:\S+)\s*$"
)
_REF_PATTERN = r"^[^\s~^:?*\[\\]{1,255}$"
_NOT_BLANK = r"\S"  # a prompt must not be blank


def _string_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """The string schema inside an optional field's anyOf [string, null]."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            return branch  # type: ignore[no-any-return]
    raise AssertionError(f"no string branch in {schema}")


def build_document(routes: list[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of these routes."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue  # mounts (static assets) are not part of the API
        path = _CONVERTER.sub(r"{\1}", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation = OPERATIONS.get((method, path)) or _generic(method, path, route)
            operation = json.loads(json.dumps(operation))  # a copy to add to
            if "parameters" not in operation and "{" in path:
                operation["parameters"] = _path_params(path)
            role = getattr(route.endpoint, "required_role", None)
            if role is not None:
                operation["security"] = [{"bearerAuth": []}]
                operation["x-required-role"] = role.value
                operation["responses"] = {**_AUTH_ERRORS, **operation["responses"]}
            else:
                operation["security"] = []
            operation["operationId"] = _operation_id(method, path)
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Forgeline API",
            "version": API_VERSION,
            "description": "Run coding agents against git repositories in isolated workspaces; "
            "get reviewable patches back. Send `Authorization: Bearer <api key>` on every "
            "operation but /healthz, /readyz and the documentation itself. Errors are "
            '`{"error": {"code", "message", "details"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key (forgeline keys create); roles viewer, "
                    "operator, admin",
                }
            },
        },
        "security": [{"bearerAuth": []}],
    }


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}") for w in path.strip("/").replace(".", "_").split("/") if w]
    return "_".join([method.lower(), *words]) or method.lower()


# -- routes ----------------------------------------------------------------------------------


async def openapi_json(request: Request) -> JSONResponse:
    """The OpenAPI 3.1 document (no key needed)."""
    return JSONResponse(build_document(list(request.app.routes)))


async def asyncapi_json(request: Request) -> Response:
    """The AsyncAPI document of the broker (docs/asyncapi.json, made by broker/schemas.py)."""
    try:
        text = ASYNCAPI_FILE.read_text()
    except OSError:
        raise ApiError(404, "not_found", "docs/asyncapi.json is not installed here") from None
    return Response(text, media_type="application/json")


async def docs_page(request: Request) -> HTMLResponse:
    """The API documentation as one self-contained page (no key, no CDN)."""
    return HTMLResponse(render_docs(build_document(list(request.app.routes))))


_METHOD_ORDER = {"get": 0, "post": 1, "put": 2, "patch": 3, "delete": 4}


def _schema_text(schema: dict[str, Any] | None) -> str:
    if not schema:
        return ""
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        return f'<a href="#schema-{name}">{html.escape(name)}</a>'
    return f"<code>{html.escape(json.dumps(schema))}</code>"


def render_docs(document: dict[str, Any]) -> str:
    esc = html.escape
    rows = []
    for path, methods in document["paths"].items():
        for method, op in sorted(methods.items(), key=lambda m: _METHOD_ORDER.get(m[0], 9)):
            body = op.get("requestBody", {}).get("content", {})
            request_schema = "".join(
                f"{esc(media)}: {_schema_text(c.get('schema'))}" for media, c in body.items()
            )
            answers = []
            for code, answer in op["responses"].items():
                content = answer.get("content", {})
                shown = ", ".join(
                    f"{esc(media)} {_schema_text(c.get('schema'))}" for media, c in content.items()
                )
                answers.append(f"<li><b>{esc(code)}</b> {esc(answer['description'])} {shown}</li>")
            auth = op.get("x-required-role")
            rows.append(
                f"<tr><td class=m>{esc(method.upper())}</td><td><code>{esc(path)}</code>"
                f"<div>{esc(op.get('summary', ''))}</div>"
                f"<div class=d>{esc(op.get('description', ''))}</div></td>"
                f"<td>{esc(auth) if auth else 'none'}</td><td>{request_schema}</td>"
                f"<td><ul>{''.join(answers)}</ul></td></tr>"
            )
    schemas = "".join(
        f'<h3 id="schema-{esc(name)}">{esc(name)}</h3>'
        f"<pre>{esc(json.dumps(schema, indent=2))}</pre>"
        for name, schema in document["components"]["schemas"].items()
    )
    info = document["info"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(info["title"])} {esc(info["version"])}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem; color: #1d2330; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-top: 1px solid #d8dce3; padding: .4rem .5rem; vertical-align: top;
  text-align: left; }}
td.m {{ font-weight: 600; font-family: monospace; }}
.d {{ color: #5a6272; font-size: 13px; }}
ul {{ margin: 0; padding-left: 1rem; }}
pre {{ background: #f4f6f9; padding: .6rem; overflow: auto; }}
</style></head><body>
<h1>{esc(info["title"])} <small>{esc(info["version"])}</small></h1>
<p>{esc(info["description"])}</p>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1) and
<a href="/asyncapi.json">/asyncapi.json</a> (the broker's streams).</p>
<h2>Operations</h2>
<table><thead><tr><th>method</th><th>path</th><th>least role</th><th>body</th>
<th>answers</th></tr></thead><tbody>{"".join(rows)}</tbody></table>
<h2>Schemas</h2>{schemas}
</body></html>
"""


ROUTES = [
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/asyncapi.json", asyncapi_json, methods=["GET"]),
    Route("/docs", docs_page, methods=["GET"]),
]

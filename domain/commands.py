"""Command models: what clients may ask for, with the limits that make a request acceptable.

Frozen pydantic models, validated at the gateway and again when a handler decodes them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from domain.agents import AGENTS, DEFAULT_AGENT

MAX_PROMPT_CHARS = 100_000
MAX_LABELS = 32
MAX_TIMEOUT_S = 86_400
DEFAULT_TIMEOUT_S = 3_600
DEFAULT_PRIORITY = 3
MAX_BUDGET_USD = 100_000.0
MAX_BUDGET_TOKENS = 1_000_000_000

_REMOTE_URL = re.compile(r"^(https?|ssh|git)://[^\s/]+(/\S*)?$")
_SCP_URL = re.compile(r"^[\w.-]+@[\w.-]+:\S+$")  # git@host:owner/repo.git
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")
_REF = re.compile(r"^[^\s~^:?*\[\\]{1,255}$")


def _check_repo(value: str) -> str:
    value = value.strip()
    if value.startswith("file://"):
        if len(value) <= len("file://") or not value[len("file://") :].startswith("/"):
            raise ValueError("a file:// URL needs an absolute path, e.g. file:///srv/repo")
        return value
    if value.startswith("/") or _REMOTE_URL.match(value) or _SCP_URL.match(value):
        return value
    raise ValueError(
        "repo must be a git URL (https://, ssh://, git://, user@host:path), "
        "a file:// URL or an absolute path"
    )


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt must not be blank")
    return value


Prompt = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_not_blank)
]


class RequestSpec(_Frozen):
    """The body of POST /v1/requests."""

    repo: Annotated[str, Field(min_length=1, max_length=4096)]
    ref: Annotated[str, Field(max_length=255)] | None = None
    prompt: Prompt
    agent: str = DEFAULT_AGENT
    agent_options: dict[str, Any] = Field(default_factory=dict)
    priority: Annotated[int, Field(ge=1, le=5)] = DEFAULT_PRIORITY
    timeout_s: Annotated[int, Field(ge=1, le=MAX_TIMEOUT_S)] = DEFAULT_TIMEOUT_S
    labels: dict[str, Annotated[str, Field(max_length=256)]] = Field(default_factory=dict)
    # What each run may spend on models through the LLM proxy (docs/llm-proxy.md); past it the
    # run fails `budget_exceeded`. Strict: a string or a boolean is refused, not converted.
    budget_usd: (
        Annotated[float, Field(gt=0, le=MAX_BUDGET_USD, strict=True, allow_inf_nan=False)] | None
    ) = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_BUDGET_TOKENS, strict=True)] | None = None

    @field_validator("repo")
    @classmethod
    def _repo_is_a_location(cls, value: str) -> str:
        return _check_repo(value)

    @field_validator("ref")
    @classmethod
    def _ref_is_a_git_name(cls, value: str | None) -> str | None:
        if value is not None and not _REF.match(value):
            raise ValueError("ref must be a branch, tag or commit name without spaces")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_within_limits(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels are allowed, got {len(value)}")
        for key in value:
            if not _LABEL_KEY.match(key):
                raise ValueError(
                    f"label key {key!r} must be 1-63 characters of letters, digits, '_.-/'"
                )
        return value

    @field_validator("agent")
    @classmethod
    def _agent_known(cls, value: str) -> str:
        if value not in AGENTS:
            raise ValueError(f"unknown agent {value!r}; known: {', '.join(sorted(AGENTS))}")
        return value

    @field_validator("agent_options")
    @classmethod
    def _options_known(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        agent = AGENTS.get(info.data.get("agent", DEFAULT_AGENT))
        if agent is None:
            return value  # the agent field reports the unknown agent
        agent.validate_options(value)  # each agent's schema (domain/agents.py): ValueError
        return value


class RerunSpec(_Frozen):
    """The body of POST /v1/requests/{id}/rerun."""

    prompt: Prompt | None = None


class SubmitRequest(_Frozen):
    kind: Literal["submit"] = "submit"
    command_id: str
    request_id: UUID
    run_id: UUID
    spec: RequestSpec
    idempotency_key: str | None = None
    submitted_by: str | None = None  # the API key's id; never the key itself


class RerunRequest(_Frozen):
    kind: Literal["rerun"] = "rerun"
    command_id: str
    request_id: UUID
    run_id: UUID
    prompt: Prompt | None = None
    requested_by: str | None = None  # the API key's id


class CancelRequest(_Frozen):
    kind: Literal["cancel"] = "cancel"
    command_id: str
    request_id: UUID
    run_id: UUID | None = None  # the run that was active when the client asked; None = latest
    reason: str = "cancelled by client"
    requested_by: str | None = None  # the API key's id


Command = Annotated[SubmitRequest | RerunRequest | CancelRequest, Field(discriminator="kind")]

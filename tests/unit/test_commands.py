"""Command models: what a client may ask for, and how a refusal names the field at fault."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
from pydantic import TypeAdapter, ValidationError

from domain.commands import (
    CancelRequest,
    Command,
    RequestSpec,
    RerunRequest,
    RerunSpec,
    SubmitRequest,
)


def make(**overrides: Any) -> RequestSpec:
    fields: dict[str, Any] = {"repo": "https://github.com/acme/widgets.git", "prompt": "true"}
    fields.update(overrides)
    return RequestSpec.model_validate(fields)


def refusal(**overrides: Any) -> list[dict[str, Any]]:
    """The errors a RequestSpec with these fields is refused with."""
    with pytest.raises(ValidationError) as raised:
        make(**overrides)
    return raised.value.errors(include_url=False)


def locs(errors: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(error["loc"]) for error in errors]


# -- repo -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "repo",
    [
        "https://github.com/acme/widgets.git",
        "http://git.internal:8080/acme/widgets",
        "ssh://git@github.com/acme/widgets.git",
        "git://git.kernel.org/pub/scm/git/git.git",
        "git@github.com:acme/widgets.git",
        "deploy@git.internal:repos/widgets",
        "file:///srv/repos/widgets",
        "/srv/repos/widgets",
    ],
)
def test_repo_accepts_git_urls_file_urls_and_absolute_paths(repo: str) -> None:
    assert make(repo=repo).repo == repo


@pytest.mark.parametrize(
    "repo",
    [
        "widgets",
        "./widgets",
        "../acme/widgets",
        "acme/widgets",
        "file://relative/widgets",
        "file://",
        "https://",
        "ftp://example.com/widgets.git",
        "",
        "   ",
    ],
)
def test_repo_refuses_relative_paths_and_other_locations(repo: str) -> None:
    assert locs(refusal(repo=repo)) == [("repo",)]


def test_repo_refusal_explains_what_is_accepted() -> None:
    (error,) = refusal(repo="file://relative")
    assert "absolute" in error["msg"]


# -- prompt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", " ", "\n\t  \n"], ids=["empty", "space", "whitespace"])
def test_prompt_must_not_be_empty_or_blank(prompt: str) -> None:
    assert locs(refusal(prompt=prompt)) == [("prompt",)]


def test_prompt_of_100000_characters_is_accepted() -> None:
    assert len(make(prompt="x" * 100_000).prompt) == 100_000


def test_prompt_of_100001_characters_is_refused() -> None:
    (error,) = refusal(prompt="x" * 100_001)
    assert error["loc"] == ("prompt",)
    assert error["type"] == "string_too_long"


def test_prompt_is_required() -> None:
    with pytest.raises(ValidationError) as raised:
        RequestSpec.model_validate({"repo": "/srv/repo"})
    assert locs(raised.value.errors()) == [("prompt",)]


# -- priority, timeout ----------------------------------------------------------------------


@pytest.mark.parametrize("priority", [1, 5])
def test_priority_accepts_1_to_5(priority: int) -> None:
    assert make(priority=priority).priority == priority


@pytest.mark.parametrize("priority", [0, 6, 9, -1])
def test_priority_outside_1_to_5_is_refused(priority: int) -> None:
    assert locs(refusal(priority=priority)) == [("priority",)]


@pytest.mark.parametrize("timeout_s", [1, 86_400])
def test_timeout_accepts_one_second_to_one_day(timeout_s: int) -> None:
    assert make(timeout_s=timeout_s).timeout_s == timeout_s


@pytest.mark.parametrize("timeout_s", [0, -5, 86_401])
def test_timeout_outside_one_second_to_one_day_is_refused(timeout_s: int) -> None:
    assert locs(refusal(timeout_s=timeout_s)) == [("timeout_s",)]


# -- labels ---------------------------------------------------------------------------------


def test_32_labels_are_accepted() -> None:
    labels = {f"key{i}": "v" for i in range(32)}
    assert make(labels=labels).labels == labels


def test_33_labels_are_refused() -> None:
    (error,) = refusal(labels={f"key{i}": "v" for i in range(33)})
    assert error["loc"] == ("labels",)
    assert "32" in error["msg"]


@pytest.mark.parametrize(
    "key", ["team", "a", "app.kubernetes.io/name", "ticket-id_2", "k" * 63], ids=repr
)
def test_label_keys_of_letters_digits_and_separators_are_accepted(key: str) -> None:
    assert make(labels={key: "v"}).labels == {key: "v"}


@pytest.mark.parametrize(
    "key", ["", "has space", "-leading-dash", ".dot", "emoji🙂", "k" * 64, "a:b"], ids=repr
)
def test_bad_label_keys_are_refused(key: str) -> None:
    (error,) = refusal(labels={key: "v"})
    assert error["loc"] == ("labels",)
    assert "label key" in error["msg"]


def test_a_label_value_over_256_characters_is_refused() -> None:
    (error,) = refusal(labels={"team": "v" * 257})
    assert error["loc"] == ("labels", "team")


# -- agent ----------------------------------------------------------------------------------


def test_unknown_agent_is_refused_with_a_message_naming_it() -> None:
    (error,) = refusal(agent="skynet")
    assert "unknown agent 'skynet'" in error["msg"]
    assert "shell" in error["msg"]  # names the agents that exist


def test_unknown_agent_option_is_refused_with_a_message_naming_it() -> None:
    (error,) = refusal(agent_options={"model": "gpt"})
    assert "shell" in error["msg"]
    assert "model" in error["msg"]


# -- the model as a whole -------------------------------------------------------------------


def test_unknown_top_level_field_is_refused() -> None:
    (error,) = refusal(colour="blue")
    assert error["loc"] == ("colour",)
    assert error["type"] == "extra_forbidden"


def test_every_bad_field_is_named_at_once() -> None:
    errors = refusal(repo="relative", prompt="", priority=0, timeout_s=0)
    assert set(locs(errors)) == {("repo",), ("prompt",), ("priority",), ("timeout_s",)}


def test_defaults() -> None:
    spec = RequestSpec(repo="/srv/repo", prompt="true")
    assert spec.agent == "shell"
    assert spec.priority == 3
    assert spec.timeout_s == 3_600
    assert spec.ref is None
    assert spec.labels == {}
    assert spec.agent_options == {}


def test_ref_with_spaces_is_refused() -> None:
    assert make(ref="feature/x").ref == "feature/x"
    assert locs(refusal(ref="my branch")) == [("ref",)]


def test_request_spec_is_frozen() -> None:
    spec = make()
    with pytest.raises(ValidationError) as raised:
        spec.priority = 1  # type: ignore[misc]
    assert raised.value.errors()[0]["type"] == "frozen_instance"
    assert spec.priority == 3


@pytest.mark.parametrize(
    "model",
    [
        RerunSpec(prompt="more"),
        SubmitRequest(command_id="c", request_id=uuid4(), run_id=uuid4(), spec=make()),
        RerunRequest(command_id="c", request_id=uuid4(), run_id=uuid4()),
        CancelRequest(command_id="c", request_id=uuid4()),
    ],
    ids=lambda model: type(model).__name__,
)
def test_command_models_are_frozen(model: Any) -> None:
    with pytest.raises(ValidationError):
        model.command_id = "other"


def test_rerun_spec_prompt_is_optional_and_limited() -> None:
    assert RerunSpec().prompt is None
    assert RerunSpec(prompt="x" * 100_000).prompt is not None
    with pytest.raises(ValidationError) as raised:
        RerunSpec(prompt="x" * 100_001)
    assert locs(raised.value.errors()) == [("prompt",)]
    with pytest.raises(ValidationError) as raised:
        RerunSpec.model_validate({"prompt": "more", "agent": "shell"})
    assert locs(raised.value.errors()) == [("agent",)]


def test_commands_round_trip_through_json_by_their_kind() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(Command)
    commands = [
        SubmitRequest(
            command_id="c1",
            request_id=uuid4(),
            run_id=uuid4(),
            spec=make(labels={"team": "core"}),
            idempotency_key="k",
        ),
        RerunRequest(command_id="c2", request_id=uuid4(), run_id=uuid4(), prompt="more"),
        CancelRequest(command_id="c3", request_id=uuid4()),
    ]
    for command in commands:
        decoded = adapter.validate_json(command.model_dump_json())
        assert decoded == command
        assert type(decoded) is type(command)


def test_a_command_of_unknown_kind_is_refused() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(Command)
    with pytest.raises(ValidationError) as raised:
        adapter.validate_python({"kind": "explode", "command_id": "c", "request_id": str(uuid4())})
    assert raised.value.errors()[0]["type"] == "union_tag_invalid"

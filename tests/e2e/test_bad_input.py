"""Bad input gets a 4xx in the error format and records nothing; unknown ids get 404;
Idempotency-Key gives the same request and records nothing new."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.support import (
    Instance,
    all_requests,
    assert_error,
    events,
    make_repo,
    submit,
    wait_request,
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("bad-input") / "repo", {"a.txt": "a\n"})


@pytest.fixture(scope="module")
def done(api: httpx.Client, repo: Path) -> dict[str, Any]:
    """A request that has finished (patch_ready), for the id-taking routes."""
    accepted = submit(api, repo, "echo b > b.txt")
    wait_request(api, accepted["request_id"])
    return accepted


def assert_records_nothing(
    api: httpx.Client, forgeline: Instance, repo: Path, action: Callable[[], None]
) -> None:
    """Runs action, then a sentinel request to its end: the store grew by the sentinel only.

    Commands go through one stream in order, so once the sentinel is done, anything the action
    had recorded would be in the store too.
    """
    events_before = forgeline.event_count()
    listed_before = len(all_requests(api))
    action()
    sentinel = submit(api, repo, "echo sentinel > s.txt")
    wait_request(api, sentinel["request_id"])
    sentinel_events = len(events(api, sentinel["request_id"]))
    assert forgeline.event_count() == events_before + sentinel_events
    assert len(all_requests(api)) == listed_before + 1


def _body(**fields: Any) -> dict[str, Any]:
    return {"repo": "/srv/repo", "prompt": "echo hi", **fields}


def _chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 64 * 1024):
        yield data[start : start + 64 * 1024]


TWO_MB = "x" * (2 * 1024 * 1024)
TWO_MB_BODY = json.dumps(_body(prompt=TWO_MB)).encode()
JSON = {"content-type": "application/json"}
NAN_BUDGET = b'{"repo": "/srv/repo", "prompt": "p", "budget_usd": NaN}'  # Python's json takes NaN

# name -> (httpx.Client.post keyword arguments, allowed statuses)
BAD_SUBMITS: dict[str, tuple[dict[str, Any], set[int]]] = {
    "missing prompt": ({"json": {"repo": "/srv/repo"}}, {422}),
    "missing repo": ({"json": {"prompt": "echo hi"}}, {422}),
    "blank prompt": ({"json": _body(prompt="   \n")}, {422}),
    "priority 9": ({"json": _body(priority=9)}, {422}),
    "priority 0": ({"json": _body(priority=0)}, {422}),
    "priority not a number": ({"json": _body(priority="high")}, {422}),
    "timeout negative": ({"json": _body(timeout_s=-1)}, {422}),
    "labels not an object": ({"json": _body(labels=["a"])}, {422}),
    "budget_usd zero": ({"json": _body(budget_usd=0)}, {422}),
    "budget_usd as text": ({"json": _body(budget_usd="5")}, {422}),
    "budget_usd NaN": ({"content": NAN_BUDGET, "headers": JSON}, {400, 422}),
    "max_tokens negative": ({"json": _body(max_tokens=-10)}, {422}),
    "max_tokens fractional": ({"json": _body(max_tokens=10.5)}, {422}),
    "unknown field": ({"json": _body(colour="blue")}, {400, 422}),
    "unknown agent": ({"json": _body(agent="no-such-agent")}, {400, 422}),
    "unknown agent option": ({"json": _body(agent_options={"model": "x"})}, {400, 422}),
    "relative repo path": ({"json": _body(repo="relative/path")}, {400, 422}),
    "file URL without an absolute path": ({"json": _body(repo="file://repo")}, {400, 422}),
    "ref with a space": ({"json": _body(ref="main branch")}, {400, 422}),
    "non-JSON body": ({"content": b"repo=/srv/repo&prompt=hi", "headers": JSON}, {400}),
    "truncated JSON": ({"content": b'{"repo": "/srv/repo", ', "headers": JSON}, {400}),
    "not UTF-8": ({"content": b'{"prompt": "\xff\xfe"}', "headers": JSON}, {400}),
    "empty body": ({"content": b"", "headers": JSON}, {400, 422}),
    "JSON array body": ({"json": [_body()]}, {400, 422}),
    "JSON string body": ({"json": "echo hi"}, {400, 422}),
    "JSON null body": ({"json": None, "content": b"null", "headers": JSON}, {400, 422}),
    "prompt over 100k characters": ({"json": _body(prompt="x" * 200_000)}, {413, 422}),
    "2 MB prompt": ({"json": _body(prompt=TWO_MB)}, {413}),
    "2 MB prompt, chunked": ({"content": "chunked", "headers": JSON}, {413}),
    "Idempotency-Key too long": (
        {"json": _body(), "headers": {"Idempotency-Key": "k" * 300}},
        {400, 422},
    ),
}


def _post_bad(api: httpx.Client, case: str) -> None:
    kwargs, statuses = BAD_SUBMITS[case]
    kwargs = dict(kwargs)
    if "content" in kwargs:
        kwargs.pop("json", None)
        if not isinstance(kwargs["content"], bytes):
            kwargs["content"] = _chunks(TWO_MB_BODY)  # a generator is good for one use only
    response = api.post("/v1/requests", **kwargs)
    error = assert_error(response, statuses)
    if response.status_code == 422:
        assert error["details"], "a validation error names the fields"


@pytest.mark.parametrize("case", list(BAD_SUBMITS), ids=list(BAD_SUBMITS))
def test_bad_submit_is_refused_in_the_error_format(api: httpx.Client, case: str) -> None:
    _post_bad(api, case)


def test_refused_submits_record_nothing(api: httpx.Client, forgeline: Instance, repo: Path) -> None:
    assert_records_nothing(api, forgeline, repo, lambda: [_post_bad(api, c) for c in BAD_SUBMITS])


def test_validation_errors_name_the_fields(api: httpx.Client) -> None:
    error = assert_error(api.post("/v1/requests", json={"repo": "rel", "priority": 9}), 422)
    fields = {detail.get("field") for detail in error["details"]}
    assert {"repo", "prompt", "priority"} <= fields, error
    assert "repo" in error["message"] and "priority" in error["message"], error


def test_bad_rerun_body_is_refused(
    api: httpx.Client, forgeline: Instance, repo: Path, done: dict[str, Any]
) -> None:
    url = f"/v1/requests/{done['request_id']}/rerun"

    def post() -> None:
        assert_error(api.post(url, content=b"{nope", headers=JSON), 400)
        assert_error(api.post(url, json=[1]), {400, 422})
        assert_error(api.post(url, json={"prompt": "  "}), 422)
        assert_error(api.post(url, json={"prompt": 5}), 422)
        assert_error(api.post(url, json={"prompt": TWO_MB}), 413)

    assert_records_nothing(api, forgeline, repo, post)


UNKNOWN_IDS = [
    str(uuid.uuid4()),
    "not-a-uuid",
    "123",
    "00000000-0000-0000-0000-00000000000g",
    "%20",
]
ID_ROUTES = [
    ("GET", "/v1/requests/{id}"),
    ("GET", "/v1/requests/{id}/events"),
    ("POST", "/v1/requests/{id}/rerun"),
    ("POST", "/v1/requests/{id}/cancel"),
    ("GET", "/v1/runs/{id}"),
    ("GET", "/v1/runs/{id}/patch"),
    ("GET", "/v1/runs/{id}/logs"),
    ("GET", "/v1/runs/{id}/logs?follow=0"),
]


def _call_unknown(api: httpx.Client, method: str, route: str) -> None:
    for ident in UNKNOWN_IDS:
        body = {} if method == "POST" else None
        error = assert_error(api.request(method, route.format(id=ident), json=body), 404)
        assert error["code"] == "not_found", error


@pytest.mark.parametrize(("method", "route"), ID_ROUTES, ids=[f"{m} {r}" for m, r in ID_ROUTES])
def test_unknown_and_malformed_ids_are_404(api: httpx.Client, method: str, route: str) -> None:
    _call_unknown(api, method, route)


def test_unknown_ids_record_nothing(api: httpx.Client, forgeline: Instance, repo: Path) -> None:
    assert_records_nothing(
        api, forgeline, repo, lambda: [_call_unknown(api, m, r) for m, r in ID_ROUTES]
    )


def test_ids_of_the_wrong_kind_are_404(api: httpx.Client, done: dict[str, Any]) -> None:
    """A run id is no request id and the other way round."""
    request_id, run_id = done["request_id"], done["run_id"]
    for method, route in ID_ROUTES:
        ident = run_id if route.startswith("/v1/requests") else request_id
        response = api.request(
            method, route.format(id=ident), json={} if method == "POST" else None
        )
        assert_error(response, 404)


def test_the_same_idempotency_key_gives_the_same_request_and_records_nothing_new(
    api: httpx.Client, forgeline: Instance, repo: Path
) -> None:
    key = f"e2e-{uuid.uuid4()}"
    body = {"repo": str(repo), "prompt": "echo idem > idem.txt"}
    headers = {"Idempotency-Key": key}
    # Twice at once, before the first is even recorded.
    first = api.post("/v1/requests", json=body, headers=headers)
    second = api.post("/v1/requests", json=body, headers=headers)
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    assert first.json() == second.json()
    request_id = first.json()["request_id"]
    view = wait_request(api, request_id)
    assert view["status"] == "patch_ready"
    recorded = events(api, request_id)

    # Again once it is done: same ids, nothing new.
    def again() -> None:
        third = api.post("/v1/requests", json=body, headers=headers)
        assert third.status_code == 202, third.text
        assert third.json() == first.json()

    assert_records_nothing(api, forgeline, repo, again)
    assert events(api, request_id) == recorded
    assert [item["id"] for item in all_requests(api)].count(request_id) == 1
    assert len(view["runs"]) == 1


def test_the_same_idempotency_key_with_another_prompt_conflicts(
    api: httpx.Client, forgeline: Instance, repo: Path
) -> None:
    key = f"e2e-{uuid.uuid4()}"
    headers = {"Idempotency-Key": key}
    accepted = api.post(
        "/v1/requests", json={"repo": str(repo), "prompt": "echo one > one.txt"}, headers=headers
    )
    assert accepted.status_code == 202
    request_id = accepted.json()["request_id"]
    wait_request(api, request_id)
    recorded = events(api, request_id)

    def reuse() -> None:
        response = api.post(
            "/v1/requests",
            json={"repo": str(repo), "prompt": "echo two > two.txt"},
            headers=headers,
        )
        assert_error(response, 409)

    assert_records_nothing(api, forgeline, repo, reuse)
    assert events(api, request_id) == recorded


def test_the_same_idempotency_key_with_another_prompt_conflicts_even_at_once(
    api: httpx.Client, repo: Path
) -> None:
    """The key's first use may not be recorded yet when the second arrives: still a conflict."""
    headers = {"Idempotency-Key": f"e2e-{uuid.uuid4()}"}
    first = api.post(
        "/v1/requests", json={"repo": str(repo), "prompt": "echo one > one.txt"}, headers=headers
    )
    second = api.post(
        "/v1/requests", json={"repo": str(repo), "prompt": "echo two > two.txt"}, headers=headers
    )
    assert first.status_code == 202
    view = wait_request(api, first.json()["request_id"])
    assert_error(second, 409)
    assert view["prompt"] == "echo one > one.txt"


def test_unknown_routes_and_methods_answer_in_the_error_format(api: httpx.Client) -> None:
    assert_error(api.get("/v1/nothing-here"), 404)
    assert_error(api.delete("/v1/requests"), 405)
    assert_error(api.put("/v1/requests/" + str(uuid.uuid4())), 405)

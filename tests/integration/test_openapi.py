"""API documentation: /openapi.json is valid OpenAPI 3.1 and documents every route; /docs and
/asyncapi.json are served without a key; schemathesis, run against a live gateway with an admin
key, finds no 5xx and no answer that breaks the document."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import httpx
from openapi_spec_validator import validate

from gateway.app import ROUTES
from gateway.openapi import ROUTES as DOC_ROUTES
from gateway.openapi import build_document
from tests.integration.test_auth import ADMIN_KEY, Start, bearer, start  # noqa: F401

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Every check but positive_data_acceptance: an opaque ?cursor= the API never returned is
# rightly a 400, though any string fits the schema.
CHECKS = "all"
EXCLUDED_CHECKS = "positive_data_acceptance"


def test_document_is_valid_openapi_3_1_and_lists_every_route() -> None:
    document = build_document([*ROUTES, *DOC_ROUTES])
    validate(document)  # raises on anything that is not OpenAPI 3.1
    assert document["openapi"].startswith("3.1")
    for route in [*ROUTES, *DOC_ROUTES]:
        for method in (route.methods or set()) - {"HEAD"}:
            operation = document["paths"][route.path][method.lower()]
            assert operation["summary"] and not operation["summary"].startswith(method)
            assert operation["responses"]
            role = getattr(route.endpoint, "required_role", None)
            if role is None:
                assert operation["security"] == [], route.path
            else:
                assert operation["security"] == [{"bearerAuth": []}], route.path
                assert {"401", "403", "429"} <= set(operation["responses"]), route.path
    schemas = document["components"]["schemas"]
    assert {"RequestSpec", "RerunSpec", "Error", "RunView", "RequestView"} <= set(schemas)
    assert "prompt" in schemas["RequestSpec"]["required"]


async def test_served_without_a_key(start: Start) -> None:  # noqa: F811
    async with start() as http:
        answer = await http.get("/openapi.json")
        assert answer.status_code == 200
        document = answer.json()
        validate(document)
        served = {path for path in document["paths"]}
        assert {route.path for route in ROUTES} <= served
        page = await http.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/v1/requests/{id}/rerun" in page.text and "<script" not in page.text
        asyncapi = await http.get("/asyncapi.json")
        assert asyncapi.status_code == 200
        assert asyncapi.json() == json.loads(
            (Path(__file__).parents[2] / "docs" / "asyncapi.json").read_text()
        )


async def test_schemathesis_finds_no_server_error_nor_schema_break(
    start: Start,  # noqa: F811
    git_repo: Path,
    tmp_path: Path,
) -> None:
    async with start() as http:
        # Something to find: a request with a finished run, so reads answer 200 too.
        accepted = (
            await http.post(
                "/v1/requests",
                json={"repo": str(git_repo), "prompt": "echo hi > hi.txt"},
                headers=bearer(ADMIN_KEY),
            )
        ).json()
        for _ in range(300):
            view = await http.get(
                f"/v1/requests/{accepted['request_id']}", headers=bearer(ADMIN_KEY)
            )
            if view.status_code == 200 and view.json()["status"] == "patch_ready":
                break
            await asyncio.sleep(0.1)
        base = str(http.base_url).rstrip("/")
        process = await asyncio.create_subprocess_exec(
            str(SCHEMATHESIS),
            "run",
            f"{base}/openapi.json",
            "--header",
            f"Authorization: Bearer {ADMIN_KEY}",
            "--checks",
            os.environ.get("FORGELINE_SCHEMATHESIS_CHECKS", CHECKS),
            "--exclude-checks",
            os.environ.get("FORGELINE_SCHEMATHESIS_EXCLUDED_CHECKS", EXCLUDED_CHECKS),
            "--max-examples",
            os.environ.get("FORGELINE_SCHEMATHESIS_EXAMPLES", "15"),
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "10",
            "--seed",
            "7",
            "--generation-deterministic",
            # The log stream of a run that exists follows it forever; the read above covers
            # it with ?follow=0 below.
            "--exclude-path",
            "/v1/runs/{id}/logs",
            # It learns the admin key's id from /v1/whoami and revokes it: every later call
            # is then a 401. Revoking is covered by test_auth.py.
            "--exclude-path",
            "/v1/keys/{id}/revoke",
            "--no-color",
            "--report",
            "har",
            "--report-har-path",
            str(tmp_path / "schemathesis.har"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
        output, _ = await asyncio.wait_for(process.communicate(), 280)
        text = output.decode(errors="replace")
        (tmp_path / "schemathesis.txt").write_text(text)
        assert process.returncode == 0, text[-6000:]
        run = accepted["run_id"]
        logs = await http.get(f"/v1/runs/{run}/logs?follow=0", headers=bearer(ADMIN_KEY))
        assert logs.status_code == 200 and "event: end" in logs.text
        assert isinstance(http, httpx.AsyncClient)


async def test_nul_in_a_body_is_refused_and_the_read_model_goes_on(
    start: Start,  # noqa: F811
    git_repo: Path,
) -> None:
    """Found by schemathesis: U+0000 in a key's name was a 500; in a prompt or a label it was
    stored and then stopped the projector for good (Postgres text and jsonb cannot hold it)."""
    async with start() as http:
        for body in (
            {"repo": str(git_repo), "prompt": "echo a\u0000b"},
            {"repo": str(git_repo), "prompt": "echo", "labels": {"team": "a\u0000"}},
        ):
            answer = await http.post("/v1/requests", json=body, headers=bearer(ADMIN_KEY))
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"]["code"] == "validation_failed"
        answer = await http.post(
            "/v1/keys", json={"role": "viewer", "name": "a\u0000"}, headers=bearer(ADMIN_KEY)
        )
        assert answer.status_code == 422, answer.text
        answer = await http.post("/v1/keys/key_%00/revoke", headers=bearer(ADMIN_KEY))
        assert answer.status_code == 404, answer.text
        accepted = (
            await http.post(
                "/v1/requests",
                json={"repo": str(git_repo), "prompt": "echo ok > ok.txt"},
                headers=bearer(ADMIN_KEY),
            )
        ).json()
        for _ in range(300):
            view = await http.get(
                f"/v1/requests/{accepted['request_id']}", headers=bearer(ADMIN_KEY)
            )
            if view.status_code == 200 and view.json()["status"] == "patch_ready":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the request never got through: {view.text}")


async def test_405_lists_every_method_of_the_path(start: Start) -> None:  # noqa: F811
    """Found by schemathesis: Starlette's Allow named only the first route of a path."""
    async with start() as http:
        answer = await http.delete("/v1/keys", headers=bearer(ADMIN_KEY))
        assert answer.status_code == 405
        assert set(answer.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}

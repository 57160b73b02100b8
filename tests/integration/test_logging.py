"""Structured logs: FORGELINE_LOG_FORMAT=json gives one JSON object a line, with the request
and run ids of the work being done (set by the command handler and the executor)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.logging_setup import JsonFormatter, log_format
from handlers import log_context
from tests.integration.test_auth import ADMIN_KEY, Start, start, submit, wait_status  # noqa: F401


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The root logger also writes JSON lines here (INFO and above) during the test."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def parsed(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_line_has_the_fields_and_the_context(json_lines: io.StringIO) -> None:
    log = logging.getLogger("forgeline.test")
    with log_context.bound(request_id="r-1", run_id="u-1"):
        log.info("hello %s", "there")
    log.warning("outside")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second, third = parsed(json_lines)
    assert first["message"] == "hello there" and first["level"] == "INFO"
    assert first["logger"] == "forgeline.test" and str(first["ts"]).endswith("+00:00")
    assert (first["request_id"], first["run_id"]) == ("r-1", "u-1")
    assert "request_id" not in second and "run_id" not in second
    assert "ValueError: boom" in str(third["exception"])


def test_format_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGELINE_LOG_FORMAT", raising=False)
    assert log_format() == "text"
    monkeypatch.setenv("FORGELINE_LOG_FORMAT", "JSON")
    assert log_format() == "json"
    monkeypatch.setenv("FORGELINE_LOG_FORMAT", "xml")
    with pytest.raises(ValueError):
        log_format()


def test_cli_writes_json_lines(tmp_path: Path) -> None:
    """The CLI's own set-up: every line on stderr is a JSON object."""
    code = (
        "import logging, sys; from forgeline.cli import _configure_logging;"
        "_configure_logging('INFO'); logging.getLogger('forgeline').info('up'); "
        "logging.getLogger('x').warning('two\\nlines')"
    )
    env = {**os.environ, "FORGELINE_LOG_FORMAT": "json"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["message"] for line in lines] == ["up", "two\nlines"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_named_process_says_its_name_on_every_line(fmt: str) -> None:
    """An extra worker process writes to its parent's stderr: its lines carry its name."""
    code = (
        "import logging; from forgeline.cli import _configure_logging;"
        "_configure_logging('INFO', 'w-2'); logging.getLogger('forgeline').info('up')"
    )
    env = {**os.environ, "FORGELINE_LOG_FORMAT": fmt}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    (line,) = done.stderr.splitlines()
    if fmt == "json":
        assert json.loads(line)["process"] == "w-2"
    else:
        assert line.endswith(" INFO [w-2] forgeline: up")


async def test_run_logs_carry_request_and_run_ids(
    start: Start,  # noqa: F811
    git_repo: Path,
    json_lines: io.StringIO,
) -> None:
    async with start() as http:
        accepted = await submit(http, ADMIN_KEY, git_repo)
        await wait_status(http, accepted["request_id"], {"patch_ready"})
    about_run = [
        line
        for line in parsed(json_lines)
        if line.get("run_id") == accepted["run_id"]
        and line.get("request_id") == accepted["request_id"]
    ]
    assert any("provisioned" in str(line["message"]) for line in about_run), parsed(json_lines)

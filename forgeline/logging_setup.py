"""Log output: text for people (default) or one JSON object per line (FORGELINE_LOG_FORMAT=json).

A JSON line holds `ts` (UTC, ISO 8601), `level`, `logger`, `message`, `request_id` and `run_id`
when the work being done is about them (handlers/log_context.py), and `exception` with the
traceback when there is one. A process given a name (an extra worker process: it writes to
the same stderr as the one that started it) says it on every line: `process` in JSON,
`[name]` in text.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import IO

from handlers import log_context

LOG_FORMAT_ENV = "FORGELINE_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("nats", "httpx", "eventsourcing")


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._process:
            entry["process"] = self._process
        entry.update(log_context.current())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_format() -> str:
    value = os.environ.get(LOG_FORMAT_ENV, "text").strip().lower() or "text"
    if value not in ("text", "json"):
        raise ValueError(f"{LOG_FORMAT_ENV} must be text or json, not {value!r}")
    return value


def configure_logging(
    level: str,
    fmt: str | None = None,
    stream: IO[str] | None = None,
    *,
    process: str | None = None,
) -> None:
    """Configures the root logger once (as logging.basicConfig does): level, and text or JSON
    (fmt, else FORGELINE_LOG_FORMAT) to stream (default stderr); process: a name for every
    line (see the module's doc)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if (fmt or log_format()) == "json":
        handler.setFormatter(JsonFormatter(process))
    elif process:
        text = TEXT_FORMAT.replace("%(name)s", f"[{process.replace('%', '%%')}] %(name)s")
        handler.setFormatter(logging.Formatter(text))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)

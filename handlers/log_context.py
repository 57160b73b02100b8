"""The request and run a piece of work is about, for the logs (forgeline/logging_setup.py).

Context variables: set by the command handler and by the executor around each command and run
attempt, read by the JSON log formatter. asyncio tasks and anyio worker threads inherit them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from uuid import UUID

request_id_var: ContextVar[str | None] = ContextVar("forgeline_request_id", default=None)
run_id_var: ContextVar[str | None] = ContextVar("forgeline_run_id", default=None)


@contextlib.contextmanager
def bound(
    *, request_id: UUID | str | None = None, run_id: UUID | str | None = None
) -> Iterator[None]:
    """Logs inside name this request and run (those given; the others stay as they were)."""
    tokens = []
    if request_id is not None:
        tokens.append((request_id_var, request_id_var.set(str(request_id))))
    if run_id is not None:
        tokens.append((run_id_var, run_id_var.set(str(run_id))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> dict[str, str]:
    """The ids known here: {"request_id", "run_id"}, each only when set."""
    ids = {"request_id": request_id_var.get(), "run_id": run_id_var.get()}
    return {name: value for name, value in ids.items() if value is not None}

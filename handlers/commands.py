"""The command handler: turns each command into events, idempotently.

Every command can arrive more than once (redelivery after a crash, a retried publish past the
dedupe window). Each is recognised by what the store already holds: a request that exists, a
run id the request already has, a cancel already asked for. Such a command records nothing.
"""

from __future__ import annotations

import logging

import anyio
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError

from broker import tracing as broker_tracing
from broker.commands import AnyCommand, decode_command
from broker.consumer import Handler, Undeliverable
from domain.application import Forgeline
from domain.commands import CancelRequest, RerunRequest, SubmitRequest
from domain.errors import DomainError
from domain.request import Request
from handlers import log_context, tracing

log = logging.getLogger(__name__)

MAX_DECISION_ATTEMPTS = 10


def handle_command(app: Forgeline, command: AnyCommand) -> None:
    """Decides and saves in one transaction; re-decides when another writer saved first."""
    with log_context.bound(request_id=command.request_id, run_id=command.run_id):
        _handle_command(app, command)


def _handle_command(app: Forgeline, command: AnyCommand) -> None:
    for _ in range(MAX_DECISION_ATTEMPTS):
        try:
            _decide(app, command)
        except IntegrityError:
            continue
        except DomainError as refused:
            # The gateway checked first, so this is a race lost to another command: the
            # command is acknowledged and recorded nowhere, as the client was told to expect.
            log.warning("command %s refused: %s", command.command_id, refused)
        return
    raise RuntimeError(f"command {command.command_id}: too many concurrent writes")


@tracing.traced_sync("decide")  # load, decide and save: one transaction
def _decide(app: Forgeline, command: AnyCommand) -> None:
    if isinstance(command, SubmitRequest):
        _submit(app, command)
    elif isinstance(command, RerunRequest):
        _rerun(app, command)
    elif isinstance(command, CancelRequest):
        _cancel(app, command)


def _submit(app: Forgeline, command: SubmitRequest) -> None:
    try:
        app.repository.get(command.request_id)
    except AggregateNotFoundError:
        pass
    else:
        return  # submitted already
    request, run = Request.submit(
        request_id=command.request_id,
        run_id=command.run_id,
        spec=command.spec,
        command_id=command.command_id,
        idempotency_key=command.idempotency_key,
        submitted_by=command.submitted_by,
    )
    app.save(request, run)


def _rerun(app: Forgeline, command: RerunRequest) -> None:
    request = app.get_request(command.request_id)
    if command.run_id in request.run_ids:
        return  # this rerun was recorded already
    latest = app.get_run(request.latest_run_id)
    run = request.rerun(
        run_id=command.run_id,
        prompt=command.prompt,
        command_id=command.command_id,
        latest=latest,
        requested_by=command.requested_by,
    )
    app.save(request, run)


def _cancel(app: Forgeline, command: CancelRequest) -> None:
    request = app.get_request(command.request_id)
    # A copy of an old cancel must not reach a rerun made since: it names its run.
    run = app.get_run(command.run_id or request.latest_run_id)
    if run.is_terminal or run.cancel_requested:
        return
    run.request_cancel(command.reason, command.command_id, command.requested_by)
    app.save(run)


def command_message_handler(app: Forgeline, js: JetStreamContext | None = None) -> Handler:
    """The consumer callback: decode, handle in a thread; the consumer acks after it returns.
    With js, the trace of each run a command queues is recorded for the executor
    (broker/tracing.py; only when tracing is on)."""

    async def handle(msg: Msg) -> None:
        with broker_tracing.processing(msg.subject, msg.headers) as span:
            try:
                command = decode_command(msg.data)
            except ValidationError as exc:
                raise Undeliverable(f"not a valid command: {exc.error_count()} error(s)") from exc
            span.set_attributes(broker_tracing.command_attributes(command))
            if js is not None and not isinstance(command, CancelRequest):
                await broker_tracing.remember_run_trace(js, command.run_id)
            try:
                await anyio.to_thread.run_sync(handle_command, app, command)
            except AggregateNotFoundError as exc:
                raise Undeliverable(
                    f"command {command.command_id} names an unknown request"
                ) from exc

    return handle

"""The command handler: turns each command into events, idempotently, a pull batch at a time.

Every command can arrive more than once (redelivery after a crash, a retried publish past the
dedupe window). Each is recognised by what the store already holds: a request that exists, a
run id the request already has, a cancel already asked for. Such a command records nothing.

A batch of commands is decided in stream order against the aggregates as the earlier commands
of the batch left them, and all their events are saved in ONE transaction, in the order
one-by-one saves would have given them (one transaction per command made Postgres' commit the
bottleneck: ~30x slower than the store's batched floor). Anything unusual in a batch (another
writer saved first, a command refused or naming an unknown request, an error) makes the whole
batch go again one command at a time, each against the store, so its outcome is exactly what
one-by-one handling gives.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import anyio
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import Aggregate, DomainEventProtocol
from eventsourcing.persistence import IntegrityError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry.trace import Span
from pydantic import ValidationError

from broker import tracing as broker_tracing
from broker.commands import AnyCommand, decode_command
from broker.consumer import Outcome, TwoStepBatchHandler, Undeliverable
from domain.application import Forgeline
from domain.commands import CancelRequest, RerunRequest, SubmitRequest
from domain.errors import DomainError
from domain.request import Request
from domain.run import Run
from handlers import log_context, tracing
from handlers.store import stored_ids

log = logging.getLogger(__name__)

MAX_DECISION_ATTEMPTS = 10


class _Aggregates:
    """The aggregates the commands of one decision pass loaded or created, by id: a later
    command of a batch decides against what an earlier one did to them."""

    def __init__(self, app: Forgeline) -> None:
        self._app = app
        self._by_id: dict[UUID, Aggregate] = {}
        # Ids the store was seen to hold no event of in this pass (one query for a batch). A
        # writer that creates one of them before the pass saves makes the save fail on the
        # store's unique (id, version): the pass goes again, one command at a time.
        self._absent: set[UUID] = set()

    def look_up(self, aggregate_ids: Iterable[UUID]) -> None:
        """Learns in one query which of these ids the store holds no event of, so that
        deciding a batch of new requests does not read the store once per command."""
        wanted = [i for i in set(aggregate_ids) if i not in self._by_id]
        if wanted:
            self._absent.update(set(wanted) - stored_ids(self._app, wanted))

    def get(self, aggregate_id: UUID) -> Aggregate:
        if aggregate_id in self._absent:
            raise AggregateNotFoundError(aggregate_id)
        if aggregate_id not in self._by_id:
            aggregate: object = self._app.repository.get(aggregate_id)
            assert isinstance(aggregate, Aggregate)
            self._by_id[aggregate_id] = aggregate
        return self._by_id[aggregate_id]

    def exists(self, aggregate_id: UUID) -> bool:
        try:
            self.get(aggregate_id)
        except AggregateNotFoundError:
            return False
        return True

    def request(self, request_id: UUID) -> Request:
        request = self.get(request_id)
        assert isinstance(request, Request)
        return request

    def run(self, run_id: UUID) -> Run:
        run = self.get(run_id)
        assert isinstance(run, Run)
        return run

    def keep(self, *aggregates: Aggregate) -> None:
        for aggregate in aggregates:
            self._by_id[aggregate.id] = aggregate
            self._absent.discard(aggregate.id)


def handle_command(app: Forgeline, command: AnyCommand, span: Span | None = None) -> None:
    """Decides and saves in one transaction; re-decides when another writer saved first.
    span: the command's message span, the parent of its decision's (tracing on)."""
    with (
        log_context.bound(request_id=command.request_id, run_id=command.run_id),
        tracing.within(span),
    ):
        _handle_command(app, command)


def _handle_command(app: Forgeline, command: AnyCommand) -> None:
    for _ in range(MAX_DECISION_ATTEMPTS):
        try:
            with tracing.step("decide"):
                changed = _decide(_Aggregates(app), command)
            if changed:
                app.save(*changed)
        except IntegrityError:
            continue
        except DomainError as refused:
            # The gateway checked first, so this is a race lost to another command: the
            # command is acknowledged and recorded nowhere, as the client was told to expect.
            log.warning("command %s refused: %s", command.command_id, refused)
        return
    raise RuntimeError(f"command {command.command_id}: too many concurrent writes")


def handle_commands(
    app: Forgeline, commands: Sequence[AnyCommand], spans: Sequence[Span | None] = ()
) -> list[Outcome]:
    """Handles commands in order: all in one transaction when nothing unusual happens, else
    one by one. One outcome per command: None (done) or the exception that stopped it.
    spans: each command's message span (tracing on), the parent of its decision's."""
    spans = list(spans) or [None] * len(commands)
    if len(commands) > 1:
        try:
            _decide_and_save_together(app, commands, spans)
        except (IntegrityError, DomainError, AggregateNotFoundError):
            log.info("a batch of %d commands goes again one by one", len(commands))
        except Exception:
            log.exception("a batch of %d commands failed; one by one", len(commands))
        else:
            return [None] * len(commands)
    return [
        _outcome_alone(app, command, span) for command, span in zip(commands, spans, strict=True)
    ]


def _decide_and_save_together(
    app: Forgeline, commands: Sequence[AnyCommand], spans: Sequence[Span | None]
) -> None:
    aggregates = _Aggregates(app)
    aggregates.look_up(c.request_id for c in commands if isinstance(c, SubmitRequest))
    events: list[DomainEventProtocol[Any]] = []
    for command, span in zip(commands, spans, strict=True):
        with (
            log_context.bound(request_id=command.request_id, run_id=command.run_id),
            tracing.within(span),
            tracing.step("decide"),
        ):
            for aggregate in _decide(aggregates, command):
                # Collected per command: the events' store order is that of one-by-one saves.
                events += aggregate.collect_events()
    if events:
        app.save_events(events)


def _outcome_alone(app: Forgeline, command: AnyCommand, span: Span | None) -> Outcome:
    try:
        handle_command(app, command, span)
    except AggregateNotFoundError:
        return Undeliverable(f"command {command.command_id} names an unknown request")
    except Exception as exc:
        log.exception("command %s failed; it will be redelivered", command.command_id)
        return exc
    return None


def _decide(aggregates: _Aggregates, command: AnyCommand) -> tuple[Aggregate, ...]:
    """Decides one command; returns the aggregates to save, in the order to save them."""
    if isinstance(command, SubmitRequest):
        return _submit(aggregates, command)
    if isinstance(command, RerunRequest):
        return _rerun(aggregates, command)
    if isinstance(command, CancelRequest):
        return _cancel(aggregates, command)
    return ()


def _submit(aggregates: _Aggregates, command: SubmitRequest) -> tuple[Aggregate, ...]:
    if aggregates.exists(command.request_id):
        return ()  # submitted already
    request, run = Request.submit(
        request_id=command.request_id,
        run_id=command.run_id,
        spec=command.spec,
        command_id=command.command_id,
        idempotency_key=command.idempotency_key,
        submitted_by=command.submitted_by,
    )
    aggregates.keep(request, run)
    return request, run


def _rerun(aggregates: _Aggregates, command: RerunRequest) -> tuple[Aggregate, ...]:
    request = aggregates.request(command.request_id)
    if command.run_id in request.run_ids:
        return ()  # this rerun was recorded already
    latest = aggregates.run(request.latest_run_id)
    run = request.rerun(
        run_id=command.run_id,
        prompt=command.prompt,
        command_id=command.command_id,
        latest=latest,
        requested_by=command.requested_by,
    )
    aggregates.keep(run)
    return request, run


def _cancel(aggregates: _Aggregates, command: CancelRequest) -> tuple[Aggregate, ...]:
    request = aggregates.request(command.request_id)
    # A copy of an old cancel must not reach a rerun made since: it names its run.
    run = aggregates.run(command.run_id or request.latest_run_id)
    if run.is_terminal or run.cancel_requested:
        return ()
    run.request_cancel(command.reason, command.command_id, command.requested_by)
    return (run,)


@dataclass
class _DecodedBatch:
    """A batch as prepare left it: each message's outcome so far (those that did not decode
    are Undeliverable), the commands that did with their index, and each one's span, still
    open (ended by decide, after the commit)."""

    outcomes: list[Outcome]
    commands: list[tuple[int, AnyCommand]]
    spans: list[Span | None]
    open_spans: contextlib.ExitStack


def command_batch_handler(
    app: Forgeline, js: JetStreamContext | None = None
) -> TwoStepBatchHandler[_DecodedBatch]:
    """The consumer callback, in two steps: prepare decodes each message on the event loop
    (while the batch before is still being decided and saved in its thread: decoding is a
    good part of a batch's time, and the save waits on Postgres without the GIL); decide
    handles the batch in a thread, after the batch before's. The consumer acks each message
    whose outcome is None once decide returns (after the commit). With js, the trace of each
    run a command queues is recorded for the executor (broker/tracing.py; only when tracing
    is on)."""

    async def prepare(msgs: Sequence[Msg]) -> _DecodedBatch:
        outcomes: list[Outcome] = [None] * len(msgs)
        commands: list[tuple[int, AnyCommand]] = []
        spans: list[Span | None] = []
        # Tracing off: no span, nothing to remember (three context managers and an await a
        # command were 3% of the command handler's CPU for nothing).
        traced = broker_tracing.enabled()
        with contextlib.ExitStack() as open_spans:  # one consumer span per message
            for index, msg in enumerate(msgs):
                span = (
                    open_spans.enter_context(broker_tracing.processing(msg.subject, msg.headers))
                    if traced
                    else None
                )
                try:
                    command = decode_command(msg.data)
                except ValidationError as exc:
                    outcomes[index] = Undeliverable(
                        f"not a valid command: {exc.error_count()} error(s)"
                    )
                    continue
                if span is not None:
                    if span.is_recording():  # sampled out: not worth building per command
                        span.set_attributes(broker_tracing.command_attributes(command))
                    if js is not None and not isinstance(command, CancelRequest):
                        with tracing.within(span):
                            await broker_tracing.remember_run_trace(js, command.run_id)
                commands.append((index, command))
                spans.append(span)
            # Kept open until decide (in the same task: TwoStepBatchHandler) has handled the
            # batch; ended here only when prepare raised.
            return _DecodedBatch(outcomes, commands, spans, open_spans.pop_all())

    async def decide(batch: _DecodedBatch) -> list[Outcome]:
        with batch.open_spans:
            handled = await anyio.to_thread.run_sync(
                handle_commands, app, [command for _, command in batch.commands], batch.spans
            )
        outcomes = list(batch.outcomes)
        for (index, _), outcome in zip(batch.commands, handled, strict=True):
            outcomes[index] = outcome
        return outcomes

    return TwoStepBatchHandler(prepare=prepare, decide=decide)

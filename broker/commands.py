"""Publishing commands to FORGELINE_COMMANDS, and decoding them on the other side."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import PubAck
from pydantic import TypeAdapter

from broker import subjects, tracing
from domain.commands import CancelRequest, Command, RerunRequest, SubmitRequest

AnyCommand = SubmitRequest | RerunRequest | CancelRequest
_COMMAND: TypeAdapter[AnyCommand] = TypeAdapter(Command)


async def publish_command(
    js: JetStreamContext, command: AnyCommand, *, timeout: float = 5
) -> PubAck:
    """Returns once JetStream has stored the command; Nats-Msg-Id dedupes a retried publish."""
    subject = subjects.command_subject(command.kind)
    with tracing.sending(subject, tracing.command_attributes(command)) as trace_headers:
        return await js.publish(
            subject,
            command.model_dump_json().encode(),
            timeout=timeout,
            stream=subjects.COMMANDS_STREAM,
            headers={"Nats-Msg-Id": command.command_id, **trace_headers},
        )


def decode_command(payload: bytes) -> AnyCommand:
    return _COMMAND.validate_json(payload)

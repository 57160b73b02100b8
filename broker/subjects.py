"""Stream names and subjects: the only place that spells them."""

from __future__ import annotations

from uuid import UUID

COMMANDS_STREAM = "FORGELINE_COMMANDS"
EVENTS_STREAM = "FORGELINE_EVENTS"
LOGS_STREAM = "FORGELINE_LOGS"
DEAD_LETTERS_STREAM = "FORGELINE_DEAD_LETTERS"

COMMANDS_SUBJECTS = "forgeline.cmd.>"
EVENTS_SUBJECTS = "forgeline.evt.>"
LOGS_SUBJECTS = "forgeline.log.>"
DEAD_LETTERS_SUBJECTS = "forgeline.dead.>"

# Durable consumer names, explicit so that restarts and other workers share them.
COMMAND_HANDLER_DURABLE = "command-handler"
EXECUTOR_DURABLE = "executor"

RELAY_BUCKET = "FORGELINE_RELAY"


def command_subject(kind: str) -> str:
    return f"forgeline.cmd.{kind}"


def event_subject(aggregate: str, event_type: str) -> str:
    return f"forgeline.evt.{aggregate}.{event_type}"


def log_subject(run_id: UUID | str) -> str:
    return f"forgeline.log.{run_id}"


def dead_letter_subject(consumer: str) -> str:
    return f"forgeline.dead.{consumer}"

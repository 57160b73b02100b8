"""The dead-letter stream: messages a consumer gave up on, each with why.

A message lands here when its handler refused it as undeliverable (a payload no retry can
help), or when it failed on its last allowed delivery. The copy keeps the original payload and
says, in headers, where it came from and why it was given up; the original is then terminated,
so it is never delivered again (no hot loop). `Nats-Msg-Id` is the original's stream and
sequence, so a crash between the copy and the termination does not copy it twice.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker import subjects

MAX_SHOWN_PAYLOAD = 4_096  # characters of the payload shown by recent()

H_REASON = "Forgeline-Dead-Reason"
H_STREAM = "Forgeline-Dead-Stream"
H_CONSUMER = "Forgeline-Dead-Consumer"
H_SUBJECT = "Forgeline-Dead-Subject"
H_SEQUENCE = "Forgeline-Dead-Sequence"
H_DELIVERIES = "Forgeline-Dead-Deliveries"


async def dead_letter(js: JetStreamContext, msg: Msg, reason: str) -> None:
    """Copies msg to FORGELINE_DEAD_LETTERS with why; the caller terminates the original."""
    meta = msg.metadata
    consumer = meta.consumer or "unknown"
    headers = {
        H_REASON: reason[:1_000].replace("\r", " ").replace("\n", " "),
        H_STREAM: meta.stream,
        H_CONSUMER: consumer,
        H_SUBJECT: msg.subject,
        H_SEQUENCE: str(meta.sequence.stream),
        H_DELIVERIES: str(meta.num_delivered),
        "Nats-Msg-Id": f"{meta.stream}:{meta.sequence.stream}",
    }
    await js.publish(
        subjects.dead_letter_subject(consumer),
        msg.data,
        stream=subjects.DEAD_LETTERS_STREAM,
        headers=headers,
    )


async def count(js: JetStreamContext) -> int:
    try:
        info = await js.stream_info(subjects.DEAD_LETTERS_STREAM)
    except NotFoundError:
        return 0
    return int(info.state.messages or 0)


async def recent(js: JetStreamContext, limit: int) -> list[dict[str, Any]]:
    """The newest dead letters first, at most limit."""
    try:
        info = await js.stream_info(subjects.DEAD_LETTERS_STREAM)
    except NotFoundError:
        return []
    first, last = int(info.state.first_seq or 0), int(info.state.last_seq or 0)
    letters: list[dict[str, Any]] = []
    seq = last
    while seq >= max(first, 1) and len(letters) < limit:
        with contextlib.suppress(NotFoundError):
            raw = await js.get_msg(subjects.DEAD_LETTERS_STREAM, seq)
            letters.append(_view(seq, raw))
        seq -= 1
    return letters


def _view(seq: int, raw: Any) -> dict[str, Any]:
    headers = raw.headers or {}
    payload = (raw.data or b"").decode(errors="replace")
    at = getattr(raw, "time", None)
    return {
        "id": seq,
        "reason": headers.get(H_REASON, ""),
        "stream": headers.get(H_STREAM),
        "consumer": headers.get(H_CONSUMER),
        "subject": headers.get(H_SUBJECT),
        "sequence": _int(headers.get(H_SEQUENCE)),
        "deliveries": _int(headers.get(H_DELIVERIES)),
        "dead_lettered_at": at.isoformat() if isinstance(at, datetime) else at,
        "payload": payload[:MAX_SHOWN_PAYLOAD],
        "payload_truncated": len(payload) > MAX_SHOWN_PAYLOAD,
    }


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None

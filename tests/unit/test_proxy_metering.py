"""What the LLM proxy reads and decides without a network: usage in each provider's replies
(whole and streamed, split anywhere), prices, run tokens."""

from __future__ import annotations

import json
from uuid import uuid4

import pytest

from handlers.proxy.pricing import FALLBACK_PRICE, Prices
from handlers.proxy.tokens import RunTokens
from handlers.proxy.usage import StreamMeter, Usage, from_body


def sse(*events: dict[str, object], done: bool = False) -> bytes:
    text = "".join(f"event: {e.get('type', 'x')}\ndata: {json.dumps(e)}\n\n" for e in events)
    return (text + ("data: [DONE]\n\n" if done else "")).encode()


CHAT_STREAM = sse(
    {"model": "gpt-4o-2024-08-06", "choices": [{"delta": {"content": "hi"}}], "usage": None},
    {
        "model": "gpt-4o-2024-08-06",
        "choices": [],
        "usage": {"prompt_tokens": 900, "completion_tokens": 12},
    },
    done=True,
)
RESPONSES_STREAM = sse(
    {"type": "response.created", "response": {"model": "gpt-5", "usage": None}},
    {"type": "response.output_text.delta", "delta": "hi"},
    {
        "type": "response.completed",
        "response": {"model": "gpt-5", "usage": {"input_tokens": 700, "output_tokens": 44}},
    },
)
MESSAGES_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "model": "claude-sonnet-4-5",
            "usage": {"input_tokens": 30, "cache_read_input_tokens": 500, "output_tokens": 1},
        },
    },
    {"type": "content_block_delta", "delta": {"text": "hi"}},
    {"type": "message_delta", "usage": {"output_tokens": 15}},
    {"type": "message_delta", "usage": {"output_tokens": 61}},
    {"type": "message_stop"},
)


@pytest.mark.parametrize(
    ("api", "stream", "expected"),
    [
        ("chat", CHAT_STREAM, Usage("gpt-4o-2024-08-06", 900, 12)),
        ("responses", RESPONSES_STREAM, Usage("gpt-5", 700, 44)),
        ("messages", MESSAGES_STREAM, Usage("claude-sonnet-4-5", 530, 61)),
    ],
)
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_streamed_usage_is_read_however_the_stream_is_cut(
    api: str, stream: bytes, expected: Usage, chunk_size: int
) -> None:
    meter = StreamMeter(api, "asked-for")  # type: ignore[arg-type]
    for start in range(0, len(stream), chunk_size):
        meter.feed(stream[start : start + chunk_size])
    assert meter.usage == expected


def test_a_stream_without_usage_reports_none() -> None:
    meter = StreamMeter("chat", "m")
    meter.feed(sse({"choices": [{"delta": {"content": "hi"}}]}, done=True))
    assert meter.usage is None


def test_crlf_streams_and_garbage_lines_are_read() -> None:
    meter = StreamMeter("chat", "m")
    meter.feed(b"data: not json\r\n\r\n: comment\r\n")
    meter.feed(b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}\r\n\r\n')
    assert meter.usage == Usage("m", 3, 4)


@pytest.mark.parametrize(
    ("api", "body", "expected"),
    [
        (
            "chat",
            {"model": "gpt-4o", "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
            (5, 2),
        ),
        ("responses", {"usage": {"input_tokens": 8, "output_tokens": 3}}, (8, 3)),
        (
            "messages",
            {"usage": {"input_tokens": 4, "cache_creation_input_tokens": 6, "output_tokens": 9}},
            (10, 9),
        ),
        # Nonsense counts are no usage: negative, text, booleans count as 0.
        ("chat", {"usage": {"prompt_tokens": -5, "completion_tokens": "2"}}, (0, 0)),
        ("chat", {"usage": {"prompt_tokens": True, "completion_tokens": 1}}, (0, 1)),
    ],
)
def test_usage_of_a_whole_reply(
    api: str, body: dict[str, object], expected: tuple[int, int]
) -> None:
    usage = from_body(api, body, "asked-for")  # type: ignore[arg-type]
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == expected
    assert usage.model == body.get("model", "asked-for")


def test_a_reply_without_usage_has_none() -> None:
    assert from_body("chat", {"choices": []}, "m") is None


def test_prices_by_longest_prefix_and_fallback() -> None:
    prices = Prices()
    assert prices.per_million("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert prices.per_million("gpt-4o-2024-08-06") == (2.50, 10.00)
    assert prices.per_million("openai/GPT-4o") == (2.50, 10.00)
    assert prices.per_million("some-new-model") == FALLBACK_PRICE
    assert prices.cost_usd("gpt-4o", 1_000_000, 100_000) == pytest.approx(3.5)
    assert Prices({"fake": (2.0, 8.0)}).cost_usd("fake-model", 1200, 34) == 0.002672


def test_run_tokens_name_their_run_and_cannot_be_forged() -> None:
    tokens = RunTokens(b"k" * 32)
    run_id = uuid4()
    token = tokens.mint(run_id, 2)
    verified = tokens.verify(token)
    assert verified is not None and (verified.run_id, verified.attempt) == (run_id, 2)
    prefix, hex_id, attempt, mac = token.split("_", 3)
    assert tokens.verify(f"{prefix}_{hex_id}_3_{mac}") is None  # another attempt
    assert tokens.verify(f"{prefix}_{uuid4().hex}_{attempt}_{mac}") is None  # another run
    assert RunTokens(b"x" * 32).verify(token) is None  # another installation
    for junk in ["", "flrun", "flrun_zz_1_a", "flrun_" + run_id.hex + "_x_" + mac, token + "x"]:
        assert tokens.verify(junk) is None
    assert "k" * 32 not in repr(tokens)
    with pytest.raises(ValueError):
        RunTokens(b"short")

"""A scripted fake model provider (OpenAI- and Anthropic-compatible) for tests, the demo and
trying Forgeline without a real provider. Not a model: it says what its script says."""

from forgeline.fake_llm.canned import FINISH_COMMAND, edit_file_script
from forgeline.fake_llm.script import Script, Shell, ToolCall, Turn
from forgeline.fake_llm.server import FakeUpstream, ReceivedRequest, UsageTotals

__all__ = [
    "FINISH_COMMAND",
    "FakeUpstream",
    "ReceivedRequest",
    "Script",
    "Shell",
    "ToolCall",
    "Turn",
    "UsageTotals",
    "edit_file_script",
]

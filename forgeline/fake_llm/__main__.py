"""`python -m forgeline.fake_llm [--host H] [--port N] [--script FILE] [--api-key KEY]`

Serves the fake model provider until interrupted; prints its URL first. Without --script it
answers every conversation by writing FAKE_LLM.md (edit_file_script).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from pathlib import Path

from forgeline.fake_llm.canned import edit_file_script
from forgeline.fake_llm.script import Script
from forgeline.fake_llm.server import FakeUpstream


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forgeline.fake_llm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default): a free port")
    parser.add_argument("--script", type=Path, help="a JSON script (see Script.from_json)")
    parser.add_argument("--api-key", help="refuse requests without this key (401)")
    args = parser.parse_args(argv)
    if args.script:
        script = Script.from_json(json.loads(args.script.read_text()))
    else:
        script = edit_file_script("FAKE_LLM.md", "Written by the fake model.\n")
    asyncio.run(_serve(FakeUpstream(script, api_key=args.api_key, host=args.host, port=args.port)))


async def _serve(fake: FakeUpstream) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with fake:
        print(f"fake model provider (scripted, not a model) on {fake.url}", flush=True)
        print(f"  OpenAI-compatible base URL:    {fake.url}/v1", flush=True)
        print(f"  Anthropic-compatible base URL: {fake.url}", flush=True)
        await stop.wait()
        usage = fake.usage_reported
        with contextlib.suppress(BrokenPipeError):
            print(
                f"served {usage.replies} replies, {usage.input_tokens} input and "
                f"{usage.output_tokens} output tokens",
                flush=True,
            )


if __name__ == "__main__":
    main()

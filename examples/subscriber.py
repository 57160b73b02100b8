"""An external subscriber to Forgeline's events, with nothing but nats-py.

    python examples/subscriber.py --url nats://127.0.0.1:4222 --durable billing --state billing.pos

Reads stream FORGELINE_EVENTS through a durable pull consumer (it resumes where it stopped) and
prints one line per event: position, CloudEvents type, aggregate id. Every message carries the
event's store position; the stream is in position order, so remembering the last position
processed (in --state) is enough to skip a message seen before: a redelivery after a lost ack,
or an event republished by hand. Run one process per --durable name. Stops on SIGINT/SIGTERM,
after --count events, or after --idle-exit seconds without a message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError


def handle(event: dict) -> None:
    """What this subscriber does with an event: here, print it."""
    print(event["position"], event["type"], event["aggregateid"], flush=True)


async def main(args: argparse.Namespace) -> None:
    state = Path(args.state) if args.state else None
    last = int(state.read_text()) if state and state.exists() else 0
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    nc = await nats.connect(args.url, name=f"subscriber-{args.durable}")
    js = nc.jetstream()
    while True:  # the stream appears when Forgeline first starts
        try:
            sub = await js.pull_subscribe(
                "forgeline.evt.>",
                durable=args.durable,
                stream="FORGELINE_EVENTS",
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000),
            )
            break
        except NotFoundError:
            await asyncio.sleep(0.5)
    handled, idle = 0, 0.0
    while not stop.is_set() and not (args.count and handled >= args.count):
        try:
            batch = min(100, args.count - handled) if args.count else 100
            messages = await sub.fetch(batch=batch, timeout=1)
        except TimeoutError:  # nothing new within the second
            idle += 1
            if args.idle_exit and idle >= args.idle_exit:
                break
            continue
        idle = 0.0
        for msg in messages:
            event = json.loads(msg.data)
            if event["position"] > last:  # else: seen already, only acknowledge it
                handle(event)
                last = event["position"]
                handled += 1
                if state:
                    state.write_text(str(last))
            await msg.ack()
    await nc.flush()  # the last acknowledgements
    await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--durable", default="example-subscriber")
    parser.add_argument("--state", help="file keeping the last position handled")
    parser.add_argument("--count", type=int, default=0, help="stop after this many events")
    parser.add_argument("--idle-exit", type=float, default=0, help="stop after idle seconds")
    asyncio.run(main(parser.parse_args()))

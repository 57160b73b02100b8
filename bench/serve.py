"""`python -m bench.serve --roles gateway,worker,...`: Forgeline's roles in one process.

The composition `forgeline up` runs (forgeline.bootstrap.run_services), with any set of roles,
on the servers of FORGELINE_NATS_URL and FORGELINE_DATABASE_URL. Prints `READY <port>` on
stdout once every role runs (port 0 without a gateway); SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from forgeline.bootstrap import Servers, run_services, start_servers
from forgeline.settings import Settings
from forgeline.startup import ALL_ROLES


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--roles", default=",".join(sorted(ALL_ROLES)))
    args = parser.parse_args()
    roles = frozenset(r for r in args.roles.split(",") if r)
    unknown = roles - ALL_ROLES
    if unknown:
        parser.error(f"unknown role(s) {sorted(unknown)}")
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    servers = start_servers(settings, progress=lambda m: print(m, file=sys.stderr))
    try:
        asyncio.run(_serve(settings, servers, roles))
    finally:
        servers.stop()
    return 0


async def _serve(settings: Settings, servers: Servers, roles: frozenset[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(port: int) -> None:
        print(f"READY {port}", flush=True)

    await run_services(
        settings,
        servers,
        stop,
        roles,
        on_ready=ready,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )


if __name__ == "__main__":
    sys.exit(main())

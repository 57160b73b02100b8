"""`python -m bench [--rounds N]`: runs the benchmarks, prints a table, writes JSON results."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from bench import e2e_latency


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds per case")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--no-docker", action="store_true", help="skip the Docker cases")
    args = parser.parse_args()
    results = [e2e_latency.run("local", rounds=args.rounds)]
    if not args.no_docker and shutil.which("docker"):
        results.append(e2e_latency.run("docker", rounds=args.rounds))
    print(f"{'case':34} {'forgeline median':>17} {'floor median':>13} {'ratio':>7}")
    for r in results:
        print(
            f"{r['case']:34} {r['forgeline']['median_ms']:>14.1f} ms"
            f" {r['by_hand']['median_ms']:>10.1f} ms {r['ratio_median']:>6.2f}x"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results-{int(time.time())}.json"
    meta = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
    }
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

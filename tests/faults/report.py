"""`python -m tests.faults.report [DIR]`: the numbers of the last run of each scenario (the JSON
files tests/faults/results/ holds, or DIR) as the Markdown tables of docs/reliability.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ORDER = [
    "worker_kill",
    "relay_kill",
    "projector_kill",
    "nats_restart",
    "cluster_node_kill",
    "postgres_restart",
    "dockerd_restart",
]


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items())) or "-"


def _sum(counts: dict[str, int]) -> int:
    return sum(counts.values())


def outcome_table(reports: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | injected | requests | accepted (client retries) | succeeded | failed, by"
        " code | of which not meant by the agent | recovered (attempt > 1) | lost | stuck |\n"
        "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| {r['scenario']} | {r['injected']} | {r['requests']} | {r['accepted']}"
        f" ({r['client_retries']}) | {r['terminal'].get('succeeded', 0)} | {_codes(r['failed'])}"
        f" | {_codes(r['unexpected'])} | {r['recovered']} | {r['lost']} | {r['stuck']} |"
        for r in reports
    ]
    return head + "\n".join(lines) + "\n"


def invariant_table(reports: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | store events | duplicated | version gaps | projection rows != replay |"
        " events missing on the stream | leaked containers / workspaces / agents |"
        " roles restarted by the supervisor | seconds (start, settle, total) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |\n"
    )
    lines = []
    for r in reports:
        s = r["seconds"]
        leaks = f"{r['leaked_containers']} / {r['leaked_workspaces']} / {r['leaked_agents']}"
        if r.get("engine_dead_containers"):
            leaks += f" (+{r['engine_dead_containers']} dead in the engine)"
        lines.append(
            f"| {r['scenario']} | {r['store_events']} | {r['duplicated']} | {r['version_gaps']}"
            f" | {r['projection_mismatches']} | {r['stream_missing']} | {leaks}"
            f" | {_codes(r['role_restarts'])} | {s.get('start')}, {s.get('settle')},"
            f" {s.get('total')} |"
        )
    return head + "\n".join(lines) + "\n"


def load(directory: Path) -> list[dict[str, Any]]:
    found = {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json")}
    return [found[name] for name in ORDER if name in found] + [
        found[name] for name in sorted(found) if name not in ORDER
    ]


def main(argv: list[str]) -> int:
    directory = Path(argv[0]) if argv else Path(__file__).parent / "results"
    reports = load(directory)
    if not reports:
        print(f"no results in {directory}: run pytest tests/faults first", file=sys.stderr)
        return 1
    print(outcome_table(reports))
    print(invariant_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

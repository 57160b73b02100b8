"""Client commands of the CLI: submit, status, logs, patch, rerun, cancel (HTTP to a gateway)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from forgeline.client import ClientError, ForgelineClient
from forgeline.settings import Settings

# Piped output is never wrapped or cut: ids must survive `| xargs` and copy-paste.
_out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

TERMINAL_REQUEST = {"patch_ready", "failed", "cancelled"}


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit a request: run an agent on a repository")
    p.add_argument("repo", help="git URL, file:// URL or absolute path")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt (for agent shell: a bash script)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    p.add_argument("--agent", default=None, help="agent name (default: shell)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an agent option (docs/agents.md); VALUE is read as JSON when it parses "
        '(20, true, ["a", "b"]), else as a string',
    )
    p.add_argument("--ref", default=None, help="branch, tag or commit (default: HEAD)")
    p.add_argument("--priority", type=int, default=None, help="1 (highest) to 5, default 3")
    p.add_argument("--timeout", type=int, default=None, dest="timeout_s", help="seconds")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--budget-usd", type=float, default=None, help="each run's model budget, in USD")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="each run's model budget, in tokens"
    )
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--wait", action="store_true", help="follow the run until it ends")
    p.set_defaults(handler=_submit)

    p = sub.add_parser("status", help="show a request, or list the newest requests")
    p.add_argument("id", nargs="?", help="request id")
    p.add_argument("--status", default=None, help="filter the list by status")
    p.set_defaults(handler=_status)

    p = sub.add_parser("logs", help="print a run's output")
    p.add_argument("run_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep following until it ends")
    p.set_defaults(handler=_logs)

    p = sub.add_parser("patch", help="print a run's patch (git diff)")
    p.add_argument("run_id")
    p.set_defaults(handler=_patch)

    p = sub.add_parser("rerun", help="run a request again on top of its latest patch")
    p.add_argument("id", help="request id")
    p.add_argument("--prompt", default=None, help="follow-up prompt")
    p.add_argument("--wait", action="store_true")
    p.set_defaults(handler=_rerun)

    p = sub.add_parser("cancel", help="cancel a request's active run")
    p.add_argument("id", help="request id")
    p.set_defaults(handler=_cancel)


def _client(settings: Settings) -> ForgelineClient:
    key = settings.api_key.get_secret_value() if settings.api_key else None
    return ForgelineClient(settings.url, key)


def _guarded(run: Any) -> Any:
    def wrapper(args: argparse.Namespace, settings: Settings) -> int:
        try:
            with _client(settings) as client:
                return int(run(client, args))
        except ClientError as exc:
            _err.print(f"[red]error:[/red] {exc}", markup=True)
            for detail in exc.details:
                field = detail.get("field") or "body"
                _err.print(f"  {field}: {detail.get('message')}", markup=False)
            return 1

    return wrapper


@_guarded
def _submit(client: ForgelineClient, args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    body: dict[str, Any] = {"repo": args.repo, "prompt": prompt}
    for key in ("agent", "ref", "priority", "timeout_s", "budget_usd", "max_tokens"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.label:
        body["labels"] = dict(label.split("=", 1) for label in args.label if "=" in label)
    if args.option:
        body["agent_options"] = dict(_option(option) for option in args.option)
    accepted = client.submit(body, idempotency_key=args.idempotency_key)
    _out.print(f"request {accepted['request_id']}  run {accepted['run_id']}")
    if not args.wait:
        return 0
    return follow_run(client, accepted["request_id"], accepted["run_id"])


def _option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


@_guarded
def _rerun(client: ForgelineClient, args: argparse.Namespace) -> int:
    accepted = client.rerun(args.id, args.prompt)
    _out.print(f"request {accepted['request_id']}  run {accepted['run_id']}")
    return follow_run(client, accepted["request_id"], accepted["run_id"]) if args.wait else 0


def follow_run(client: ForgelineClient, request_id: str, run_id: str) -> int:
    """Shows the run's progress and live output until it ends; 0 when a patch is ready."""
    with _err.status(f"waiting for run {run_id} to be recorded") as spinner:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.run(run_id)
                break
            except ClientError as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        spinner.update(f"run {run_id}: running")
        for event, data in client.logs(run_id, follow=True):
            if event == "log":
                style = {"stderr": "yellow", "system": "dim"}.get(data["stream"], "")
                _out.print(
                    f"[{style}]{data['line']}[/{style}]" if style else data["line"],
                    markup=bool(style),
                )
    request = client.request(request_id)
    run = client.run(run_id)
    _print_outcome(request, run)
    return 0 if request["status"] == "patch_ready" else 1


def _print_outcome(request: dict[str, Any], run: dict[str, Any]) -> None:
    colour = {"patch_ready": "green", "failed": "red"}.get(request["status"], "yellow")
    _out.print(f"[{colour}]{request['status']}[/{colour}]  run {run['id']} (#{run['number']})")
    if run["error"]:
        _out.print(f"  error: {run['error']['code']}: {run['error']['message']}")
    if run["patch"]:
        p = run["patch"]
        _out.print(
            f"  patch: {p['files_changed']} file(s), +{p['insertions']} -{p['deletions']},"
            f" sha256 {p['sha256'][:12]}  (forgeline patch {run['id']})"
        )
    if run.get("usage"):
        u = run["usage"]
        _out.print(
            f"  model usage: {u['input_tokens']} tokens in, {u['output_tokens']} out,"
            f" ${u['cost_usd']:.4f}"
        )


@_guarded
def _status(client: ForgelineClient, args: argparse.Namespace) -> int:
    if args.id:
        request = client.request(args.id)
        _out.print(f"request {request['id']}  [bold]{request['status']}[/bold]")
        _out.print(
            f"  repo {request['repo']} @ {request['ref'] or 'HEAD'}  agent {request['agent']}"
            f"  priority {request['priority']}"
        )
        table = Table("run", "number", "status", "attempt", "exit", "error", "patch", "cost")
        for run in request["runs"]:
            patch = run["patch"]
            table.add_row(
                run["id"],
                str(run["number"]),
                run["status"],
                str(run["attempt"]),
                "" if run["exit_code"] is None else str(run["exit_code"]),
                run["error"]["code"] if run["error"] else "",
                f"+{patch['insertions']} -{patch['deletions']}" if patch else "",
                f"${run['usage']['cost_usd']:.4f}" if run.get("usage") else "",
            )
        _out.print(table)
        return 0
    page = client.requests(status=args.status)
    table = Table("request", "status", "agent", "repo", "created")
    for item in page["items"]:
        table.add_row(item["id"], item["status"], item["agent"], item["repo"], item["created_at"])
    _out.print(table)
    return 0


@_guarded
def _logs(client: ForgelineClient, args: argparse.Namespace) -> int:
    for event, data in client.logs(args.run_id, follow=args.follow):
        if event == "log":
            stream = sys.stderr if data["stream"] == "stderr" else sys.stdout
            print(data["line"], file=stream, flush=True)
        elif event == "end":
            _err.print(f"[dim]-- run {data['status']}[/dim]")
    return 0


@_guarded
def _patch(client: ForgelineClient, args: argparse.Namespace) -> int:
    sys.stdout.write(client.patch(args.run_id))
    return 0


@_guarded
def _cancel(client: ForgelineClient, args: argparse.Namespace) -> int:
    accepted = client.cancel(args.id)
    _out.print(f"cancel asked for run {accepted['run_id']} of request {accepted['request_id']}")
    return 0

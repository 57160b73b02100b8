"""The HTTP client behind the CLI's client commands (submit, status, logs, patch, ...)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


class ClientError(Exception):
    """An error answer from the gateway, or no answer at all; the message names the fix."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or []


class ForgelineClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._url = url
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ForgelineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(
                f"cannot reach the gateway at {self._url} ({exc}); is `forgeline up` running? "
                "Set FORGELINE_URL to point elsewhere."
            ) from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._call("POST", "/v1/requests", json=body, headers=headers).json())

    def request(self, request_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/requests/{request_id}").json())

    def requests(self, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return dict(self._call("GET", "/v1/requests", params=params).json())

    def run(self, run_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/runs/{run_id}").json())

    def patch(self, run_id: str) -> str:
        return self._call("GET", f"/v1/runs/{run_id}/patch").text

    def rerun(self, request_id: str, prompt: str | None = None) -> dict[str, Any]:
        body = {"prompt": prompt} if prompt is not None else {}
        return dict(self._call("POST", f"/v1/requests/{request_id}/rerun", json=body).json())

    def cancel(self, request_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/requests/{request_id}/cancel").json())

    def events(self, request_id: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/requests/{request_id}/events").json()["events"])

    def logs(self, run_id: str, follow: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yields (event, data) pairs of the run's log stream: ('log', line) ... ('end', status)."""
        params = {"follow": "1" if follow else "0"}
        try:
            with self._http.stream(
                "GET", f"/v1/runs/{run_id}/logs", params=params, timeout=None
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response)
                yield from _parse_sse(response.iter_lines())
        except httpx.TransportError as exc:
            raise ClientError(f"the log stream from {self._url} broke off: {exc}") from None


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    event, data = "message", ""
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            yield event, json.loads(data)
            event, data = "message", ""


def _error_from(response: httpx.Response) -> ClientError:
    try:
        error = response.json()["error"]
        return ClientError(
            f"{error['message']} ({error['code']})",
            response.status_code,
            error["code"],
            list(error.get("details") or []),
        )
    except (ValueError, KeyError, TypeError):
        return ClientError(
            f"HTTP {response.status_code}: {response.text[:200]}", response.status_code
        )

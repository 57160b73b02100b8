"""Per-run tokens: what an agent authenticates to the LLM proxy with, instead of a real key.

A token names its run and attempt and carries an HMAC of them under the installation's proxy
secret, so any proxy of the installation verifies it without shared state. It is only as good
as its run: the proxy also checks, in the store, that the run is running that very attempt, so
a token is worthless once its run ended or was handed to another attempt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from uuid import UUID

PREFIX = "flrun"


@dataclass(frozen=True)
class RunToken:
    run_id: UUID
    attempt: int


class RunTokens:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the proxy secret must be at least 16 bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "RunTokens(secret=***)"

    def _mac(self, run_id: UUID, attempt: int) -> str:
        digest = hmac.new(self._secret, f"{run_id}:{attempt}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def mint(self, run_id: UUID, attempt: int) -> str:
        return f"{PREFIX}_{run_id.hex}_{attempt}_{self._mac(run_id, attempt)}"

    def verify(self, token: str) -> RunToken | None:
        """The run and attempt a token is for, or None when it is not one of ours."""
        parts = token.split("_", 3)  # the MAC is base64url: it may hold "_" itself
        if len(parts) != 4 or parts[0] != PREFIX or not parts[2].isdigit():
            return None
        try:
            run_id = UUID(hex=parts[1])
        except ValueError:
            return None
        attempt = int(parts[2])
        if not hmac.compare_digest(parts[3], self._mac(run_id, attempt)):
            return None
        return RunToken(run_id, attempt)

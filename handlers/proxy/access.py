"""What a run's agent is given to reach a model: the proxy's URLs and a token for its run."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from handlers.agents.base import LlmAccess
from handlers.proxy.tokens import RunTokens


@dataclass(frozen=True)
class LlmGrants:
    tokens: RunTokens
    base_url: str  # the proxy as seen from inside the workspaces, e.g. http://127.0.0.1:4141

    def for_run(self, run_id: UUID, attempt: int) -> LlmAccess:
        base = self.base_url.rstrip("/")
        return LlmAccess(
            openai_base_url=f"{base}/openai/v1",
            anthropic_base_url=f"{base}/anthropic",
            token=self.tokens.mint(run_id, attempt),
        )

"""What model calls cost: dollars per million input and output tokens, by model name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Public list prices (USD per million tokens, input / output) of common models, as a default
# for FORGELINE_LLM_PRICES. A model is priced by the longest name in the table it starts with;
# one not in the table costs the fallback price, which errs on the expensive side so that a
# budget stops a run too early rather than too late.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
    "o3": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-opus-4": (15.00, 75.00),
}
FALLBACK_PRICE = (15.00, 75.00)


@dataclass(frozen=True)
class Prices:
    table: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    fallback: tuple[float, float] = FALLBACK_PRICE

    def per_million(self, model: str) -> tuple[float, float]:
        # Providers may prefix a model ("openai/gpt-4o") or date it ("gpt-4o-2024-08-06").
        name = model.rsplit("/", 1)[-1].lower()
        matches = [key for key in self.table if name.startswith(key.lower())]
        return self.table[max(matches, key=len)] if matches else self.fallback

    def cost_usd(self, model: str, input_tokens: int, output_tokens: int) -> float:
        per_in, per_out = self.per_million(model)
        return round((input_tokens * per_in + output_tokens * per_out) / 1_000_000, 6)

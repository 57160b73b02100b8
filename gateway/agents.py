"""`GET /v1/agents` (viewer): the agents a request may name, with the JSON Schema of the
agent_options each accepts and whether it calls a model (through the LLM proxy)."""

from __future__ import annotations

from functools import cache
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from domain.agents import AGENTS


@cache
def catalogue() -> dict[str, Any]:
    return {
        "agents": [
            {
                "name": spec.name,
                "description": spec.description,
                "needs_llm": spec.needs_llm,
                "options_schema": spec.options_schema,
            }
            for spec in AGENTS.values()
        ]
    }


async def list_agents(request: Request) -> JSONResponse:
    return JSONResponse(catalogue())

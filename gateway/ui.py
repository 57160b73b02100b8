"""The web UI: plain ES modules and CSS under gateway/static/, served by the gateway itself.

`/` is the single page (index.html; hash routing inside), `/static/...` its assets. Neither needs
a key: the page asks for one and sends it as `Authorization: Bearer <key>` on every /v1 call
(kept in the browser's sessionStorage, never in a URL). No build step and nothing from a CDN.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).with_name("static")

# The page loads only its own files and talks only to its own origin.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_HEADERS)


class _StaticFiles(StaticFiles):
    """StaticFiles with the UI's headers (revalidated on each load: upgrades show at once)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update({"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
        return response


ROUTES: list[BaseRoute] = [
    Route("/", index, methods=["GET"]),
    Mount("/static", app=_StaticFiles(directory=STATIC_DIR), name="static"),
]

"""`forgeline image build` and `forgeline image info`: the workspace image of the Docker
provisioner (recipe and offline build in handlers/workspaces/image.py)."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from forgeline.settings import Settings

if TYPE_CHECKING:  # imported when a command runs: `forgeline status` need not load aiohttp
    import aiodocker

_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)


def cache_dir(settings: Settings) -> Path:
    """Where image builds keep their lock, the downloaded .debs and the transient rootfs."""
    return settings.data_dir / "image-cache"


def add_parsers(sub: Any) -> None:
    image = sub.add_parser("image", help="the workspace image: build it, or show what is used")
    actions = image.add_subparsers(dest="image_action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "build",
        help="make the workspace image ready now: pulled if a registry has it, else built "
        "offline (debootstrap + docker import)",
    )
    p.add_argument("--force", action="store_true", help="rebuild it even when present")
    p.add_argument("-v", "--verbose", action="store_true", help="print every debootstrap line")
    p.set_defaults(handler=_build)
    p = actions.add_parser("info", help="show which workspace image is used, and its state")
    p.set_defaults(handler=_info)


def _build(args: argparse.Namespace, settings: Settings) -> int:
    return _with_docker(settings, lambda docker: _build_async(docker, args, settings))


def _info(args: argparse.Namespace, settings: Settings) -> int:
    return _with_docker(settings, lambda docker: _info_async(docker, settings))


def _with_docker(settings: Settings, run: Callable[[aiodocker.Docker], Awaitable[int]]) -> int:
    import aiodocker
    from aiodocker.exceptions import DockerError

    from handlers.workspaces.image import ImageUnavailable

    async def main() -> int:
        try:
            docker = aiodocker.Docker(url=settings.docker_url)
        except (ValueError, AssertionError) as exc:  # no socket found, no DOCKER_HOST
            return _no_engine(settings, exc)
        try:
            return await run(docker)
        except ImageUnavailable as exc:
            _err.print(f"[red]error:[/red] {exc}")
            return 1
        except DockerError as exc:
            if exc.status == 900:  # aiodocker's "cannot connect"
                return _no_engine(settings, exc)
            _err.print(f"[red]Docker error:[/red] {exc}")
            return 1
        finally:
            await docker.close()

    return asyncio.run(main())


def _no_engine(settings: Settings, exc: Exception) -> int:
    where = settings.docker_url or "DOCKER_HOST or the local socket"
    detail = f" ({exc})" if str(exc) else ""
    _err.print(
        f"[red]error:[/red] no Docker engine answered at {where}{detail}; "
        "start one (scripts/ensure-docker.sh) or set FORGELINE_DOCKER_URL"
    )
    return 1


async def _build_async(docker: aiodocker.Docker, args: argparse.Namespace, s: Settings) -> int:
    from handlers.workspaces.image import ensure_image, image_info

    image, started = s.workspace_image, time.monotonic()
    verbose = args.verbose or not _err.is_terminal
    with _err.status(f"checking {image}") as status:
        phase = [f"checking {image}"]

        def progress(message: str) -> None:
            elapsed = f"{time.monotonic() - started:5.0f}s"
            if message.startswith("  "):  # a line of debootstrap's or the import's
                if verbose or message.lstrip().startswith(("W:", "E:")):
                    _err.print(f"[dim]{elapsed} {message.strip()}[/dim]")
                status.update(f"{phase[0]}\n  [dim]{message.strip()[:100]}[/dim]")
            else:
                phase[0] = message
                _err.print(f"[bold]{elapsed}[/bold] {message}")
                status.update(message)

        before = await image_info(docker, image)
        await ensure_image(
            docker,
            image,
            mirror=s.debian_mirror,
            progress=progress,
            cache_dir=cache_dir(s),
            force=args.force,
        )
    after = await image_info(docker, image)
    took = time.monotonic() - started
    summary = f"{_mb(after['size'])}, id {str(after['id'])[7:19]}, {took:.0f} s"
    if before["id"] == after["id"]:
        _out.print(f"{image} is present ({after['state']}): {summary}; --force rebuilds it")
    else:
        _out.print(f"[green]{image} is ready[/green]: {summary}")
    return 0


async def _info_async(docker: aiodocker.Docker, s: Settings) -> int:
    from handlers.workspaces.image import RECIPE, image_info, mirror_from_apt

    info = await image_info(docker, s.workspace_image)
    meaning = {
        "fresh": "present, built from the current recipe",
        "foreign": "present, not built by Forgeline: used as it is",
        "stale": "present, from an older recipe: rebuilt on first use",
        "absent": "absent: pulled if a registry has it, else built offline on first use",
    }
    mirror = s.debian_mirror or mirror_from_apt(RECIPE.suite)
    table = Table(show_header=False, box=None)
    for key, value in [
        ("image", info["image"]),
        ("state", meaning[info["state"]]),
        ("id", info["id"] or "-"),
        ("size", _mb(info["size"]) if info["present"] else "-"),
        ("created", info["created"] or "-"),
        ("recipe label", info["recipe_label"] or "-"),
        ("current recipe", f"{info['recipe']} ({RECIPE.suite}, {' '.join(RECIPE.packages)})"),
        ("debootstrap", shutil.which("debootstrap") or "missing: apt-get install debootstrap"),
        ("Debian mirror", mirror or "none found: set FORGELINE_DEBIAN_MIRROR"),
        ("build cache", str(cache_dir(s))),
    ]:
        table.add_row(f"[bold]{key}[/bold]", str(value))
    _out.print(table)
    return 0


def _mb(size: Any) -> str:
    return f"{int(size) / 1e6:.1f} MB" if size is not None else "-"

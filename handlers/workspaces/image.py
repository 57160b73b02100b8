"""The workspace image: the one recipe, and how it gets onto the Docker engine.

ensure_image() uses the image when the engine has it, else pulls it (briefly: most places here
have no registry), else builds it offline: debootstrap from a Debian mirror, `docker import` of
the rootfs. Our builds carry two labels, the recipe's digest and the name built as; an image of
that name whose recipe label differs is rebuilt. Any other image is used as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from handlers.workspaces.agent_tools import (
    ToolInstallFailed,
    install_agent_tools,
    pinned_tools,
    stream_process,
)
from handlers.workspaces.base import WorkspaceError

Progress = Callable[[str], None]  # phases as sentences; tool output lines start with "  "
State = Literal["absent", "fresh", "stale", "foreign"]
RECIPE_LABEL = "org.forgeline.recipe"
NAME_LABEL = "org.forgeline.image"
PULL_TIMEOUT_S = 20.0
INSPECT_TIMEOUT_S = 30.0
DEBOOTSTRAP_TIMEOUT_S = 1800.0
IMPORT_TIMEOUT_S = 900.0


class ImageUnavailable(WorkspaceError):
    """The workspace image is not here and cannot be pulled or built; the message says why."""


@dataclass(frozen=True)
class ImageRecipe:
    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = (
        *("git", "bash", "python3", "ca-certificates"),
        *("coreutils", "findutils", "sed", "grep"),
        *("python3-venv", "procps"),  # mini-swe-agent's venv; ps for agents that look around
    )
    user: str = "agent"
    uid: int = 1000
    gid: int = 1000
    home: str = "/home/agent"
    workdir: str = "/workspace"
    env: tuple[str, ...] = (
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C.UTF-8",
    )
    # Trimmed: folders emptied after the install (docs, apt's lists and caches, logs, /dev).
    trim: tuple[str, ...] = (
        *("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"),
        *("var/lib/apt/lists", "var/cache/apt", "var/log", "dev"),
    )
    # The agent CLIs (handlers/workspaces/agent_tools.py), pinned; () builds the image without.
    agent_tools: tuple[str, ...] = pinned_tools()
    steps: int = 2  # bump whenever _customise() or the build's steps change what they do

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def changes(self, image: str) -> list[str]:
        """Dockerfile-style instructions `docker import` applies to the image's config."""
        return [
            f"LABEL {RECIPE_LABEL}={self.digest}",
            f"LABEL {NAME_LABEL}={image}",
            f"WORKDIR {self.workdir}",
            f"USER {self.uid}:{self.gid}",
            *(f"ENV {e}" for e in self.env),
        ]


RECIPE = ImageRecipe()


async def ensure_image(
    docker: aiodocker.Docker,
    image: str,
    *,
    mirror: str | None,
    progress: Progress,
    cache_dir: Path,
    recipe: ImageRecipe = RECIPE,
    force: bool = False,
) -> str:
    """The image reference to run workspaces from, pulled or built first when needed."""
    if not force:
        state = _state(await _inspect(docker, image), image, recipe)
        if state in ("fresh", "foreign"):
            return image
        progress(f"{image} is {'absent' if state == 'absent' else 'from an older recipe'}")
        if await _pull(docker, image, progress) and await _usable(docker, image, recipe):
            return image
    cache_dir = cache_dir.resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    async with _build_lock(cache_dir / "build.lock", progress):  # one build per cache_dir
        if force or not await _usable(docker, image, recipe):  # else built while we waited
            await build_image(
                docker, image, mirror=mirror, progress=progress, cache_dir=cache_dir, recipe=recipe
            )
    return image


async def image_info(
    docker: aiodocker.Docker, image: str, recipe: ImageRecipe = RECIPE
) -> dict[str, Any]:
    """What the engine has under that name: present, state, id, size, created, recipe label."""
    info = await _inspect(docker, image)
    labels = ((info or {}).get("Config") or {}).get("Labels") or {}
    return {
        "image": image,
        "present": info is not None,
        "state": _state(info, image, recipe),
        "id": info and info["Id"],
        "size": info and info["Size"],
        "created": info and info["Created"],
        "recipe_label": labels.get(RECIPE_LABEL),
        "recipe": recipe.digest,
    }


async def build_image(
    docker: aiodocker.Docker,
    image: str,
    *,
    mirror: str | None,
    progress: Progress,
    cache_dir: Path,
    recipe: ImageRecipe = RECIPE,
) -> None:
    """Builds the recipe offline, tags it as image; callers hold cache_dir's build lock."""
    if os.geteuid() != 0:
        raise ImageUnavailable(
            "building the workspace image needs root (debootstrap): run "
            "`sudo forgeline image build` once, or set "
            "FORGELINE_WORKSPACE_IMAGE to an image the engine has"
        )
    if not shutil.which("debootstrap"):
        raise ImageUnavailable(
            "debootstrap is not installed: apt-get install debootstrap "
            "(scripts/ensure-docker.sh installs it)"
        )
    if recipe.agent_tools and not shutil.which("npm"):
        raise ImageUnavailable(
            "npm is not installed: it installs Codex and Claude Code into the workspace image "
            "(apt-get install npm; scripts/ensure-docker.sh installs it)"
        )
    mirror = mirror or mirror_from_apt(recipe.suite)
    if not mirror:
        raise ImageUnavailable(
            "no Debian mirror found in apt's sources: set "
            "FORGELINE_DEBIAN_MIRROR to a Debian mirror URL"
        )
    for leftover in cache_dir.glob("rootfs-*"):  # from a build that was killed
        await asyncio.to_thread(_remove_tree, leftover)
    old = await _inspect(docker, image)
    rootfs = cache_dir / f"rootfs-{uuid.uuid4().hex[:12]}"
    try:
        progress(f"debootstrap {recipe.suite} ({recipe.variant}) from {mirror}")
        await _debootstrap(rootfs, mirror, recipe, cache_dir / "debs", progress)
        if recipe.agent_tools:
            progress("installing the agent CLIs (npm registry, PyPI)")
            try:
                await install_agent_tools(rootfs, cache_dir, progress)
            except ToolInstallFailed as exc:
                raise ImageUnavailable(str(exc)) from None
        progress(f"adding user {recipe.user} ({recipe.uid}), {recipe.workdir}; trimming")
        await asyncio.to_thread(_customise, rootfs, recipe)
        progress(f"importing the rootfs into Docker as {image}")
        await _import(docker, rootfs, image, recipe)
    finally:
        await asyncio.to_thread(_remove_tree, rootfs)
    new = await _inspect(docker, image)
    if old and new and old["Id"] != new["Id"]:  # the replaced build, unless a container uses it
        with contextlib.suppress(DockerError):
            await docker.images.delete(old["Id"])


def mirror_from_apt(suite: str, etc_apt: Path = Path("/etc/apt")) -> str | None:
    """The first deb URI in apt's sources (apt's order) that serves suite, else that serves
    any main-archive suite (no -updates, -security...)."""
    entries: list[tuple[str, list[str]]] = []
    for path in [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]:
        text = path.read_text(errors="replace") if path.is_file() else ""
        if path.suffix == ".list":
            line = r"(?m)^[ \t]*deb[ \t]+(?:\[[^\]]*\][ \t]+)?(\S+)[ \t]+(\S+)"
            entries += [(m[1], [m[2]]) for m in re.finditer(line, text)]
        elif path.suffix == ".sources":  # deb822 paragraphs
            for para in re.split(r"\n[ \t]*\n", re.sub(r"(?m)^[ \t]*#.*\n?", "", text)):
                found = re.findall(r"(?m)^([\w-]+):(.*(?:\n[ \t].*)*)", para)
                f = {key.lower(): value.split() for key, value in found}
                if "deb" in f.get("types", []) and f.get("enabled") != ["no"]:
                    entries += [(uri, f.get("suites", [])) for uri in f.get("uris", [])]
    usable = [(uri, s) for uri, s in entries if re.match(r"(https?|file)://", uri)]
    for match in (lambda s: s == suite, lambda s: not re.search(r"[-/]", s)):
        for uri, suites in usable:
            if any(match(s) for s in suites):
                return uri
    return None


async def _inspect(docker: aiodocker.Docker, image: str) -> dict[str, Any] | None:
    try:
        async with asyncio.timeout(INSPECT_TIMEOUT_S):
            return await docker.images.inspect(image)
    except DockerError as exc:
        if exc.status == 404:
            return None
        raise


def _state(info: dict[str, Any] | None, image: str, recipe: ImageRecipe) -> State:
    if info is None:
        return "absent"
    labels = (info.get("Config") or {}).get("Labels") or {}
    if RECIPE_LABEL not in labels or labels.get(NAME_LABEL) != image:
        return "foreign"
    return "fresh" if labels[RECIPE_LABEL] == recipe.digest else "stale"


async def _usable(docker: aiodocker.Docker, image: str, recipe: ImageRecipe) -> bool:
    return _state(await _inspect(docker, image), image, recipe) in ("fresh", "foreign")


async def _pull(docker: aiodocker.Docker, image: str, progress: Progress) -> bool:
    progress(f"pulling {image} (giving up after {PULL_TIMEOUT_S:g} s)")
    try:
        async with asyncio.timeout(PULL_TIMEOUT_S):
            await docker.images.pull(image)
        return True
    except Exception as exc:  # any failure means: no registry has it for us
        progress(f"not pulled ({str(exc)[:160] or type(exc).__name__}): building it offline")
        return False


@contextlib.asynccontextmanager
async def _build_lock(path: Path, progress: Progress) -> AsyncIterator[None]:
    """An flock on path: one build per image name across processes (and coroutines)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(1_000_000):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 0:
                    progress("another process is building this image: waiting for it")
                await asyncio.sleep(0.5)
        yield
    finally:
        os.close(fd)


async def _debootstrap(
    rootfs: Path, mirror: str, recipe: ImageRecipe, debs: Path, progress: Progress
) -> None:
    debs.mkdir(parents=True, exist_ok=True)  # downloaded .debs, kept for the next build
    opts = [f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}"]
    argv = ["debootstrap", *opts, f"--cache-dir={debs}", recipe.suite, str(rootfs), mirror]
    try:
        code, tail = await stream_process(
            argv, {**os.environ, "LC_ALL": "C"}, progress, DEBOOTSTRAP_TIMEOUT_S
        )
    except TimeoutError:
        raise ImageUnavailable(f"debootstrap ran over {DEBOOTSTRAP_TIMEOUT_S:g} s") from None
    if code != 0:
        raise ImageUnavailable(
            f"debootstrap failed (exit {code}) with mirror {mirror}: "
            + " | ".join(tail)
            + " -- check the mirror, or set FORGELINE_DEBIAN_MIRROR"
        )


def _customise(rootfs: Path, recipe: ImageRecipe) -> None:
    etc = rootfs / "etc"
    taken = [ln.split(":") for ln in (etc / "passwd").read_text().splitlines()]
    if any(f[0] == recipe.user or f[2] == str(recipe.uid) for f in taken if len(f) > 2):
        raise ImageUnavailable(f"the rootfs already has user {recipe.user} or uid {recipe.uid}")
    for name, line in [
        ("passwd", f"x:{recipe.uid}:{recipe.gid}::{recipe.home}:/bin/bash"),
        ("group", f"x:{recipe.gid}:"),
        ("shadow", "*:19000:0:99999:7:::"),
        ("gshadow", "!::"),
    ]:
        if (etc / name).exists():
            with (etc / name).open("a") as f:
                f.write(f"{recipe.user}:{line}\n")
    for folder in (recipe.home, recipe.workdir):
        path = rootfs / folder.lstrip("/")
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(path, recipe.uid, recipe.gid)
    for trimmed in recipe.trim:  # keep the folders, drop what is in them
        for child in (rootfs / trimmed).glob("*"):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for partial in ("var/lib/apt/lists/partial", "var/cache/apt/archives/partial"):
        (rootfs / partial).mkdir(parents=True, exist_ok=True)
    for host_file in ("etc/resolv.conf", "etc/hostname"):  # Docker provides its own
        (rootfs / host_file).unlink(missing_ok=True)


async def _import(docker: aiodocker.Docker, rootfs: Path, image: str, recipe: ImageRecipe) -> None:
    """POST /images/create?fromSrc=- with the rootfs tar streamed straight from `tar`."""
    repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
    params = [("fromSrc", "-"), ("repo", repo), ("tag", tag)]
    query = urlencode(params + [("changes", c) for c in recipe.changes(image)], quote_via=quote)
    argv = ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", "-", "."]
    pipe = subprocess.PIPE
    tar = await asyncio.create_subprocess_exec(*argv, stdout=pipe, stderr=pipe)
    assert tar.stdout is not None and tar.stderr is not None
    reader, errors = tar.stdout, asyncio.ensure_future(tar.stderr.read())

    async def body() -> AsyncIterator[bytes]:
        while chunk := await reader.read(1 << 20):
            yield chunk

    try:
        async with asyncio.timeout(IMPORT_TIMEOUT_S):
            headers = {"Content-Type": "application/x-tar"}
            no_total = aiohttp.ClientTimeout(total=None, sock_connect=30)  # asyncio bounds it
            request = docker._query(
                f"images/create?{query}",
                "POST",
                data=body(),
                chunked=True,
                headers=headers,
                timeout=no_total,
            )
            async with request as response:
                answer = await response.text()
            err, code = await errors, await tar.wait()
    except (DockerError, TimeoutError) as exc:
        raise ImageUnavailable(f"docker import failed: {exc}") from None
    finally:
        if tar.returncode is None:
            tar.kill()
            await tar.wait()
        errors.cancel()
    messages = [json.loads(ln) for ln in answer.splitlines() if ln.strip()]
    if failed := [m["error"] for m in messages if "error" in m]:
        raise ImageUnavailable(f"docker import failed: {failed[0]}")
    if code != 0:
        raise ImageUnavailable(f"tar of the rootfs failed: {err.decode(errors='replace')[-300:]}")


def _remove_tree(path: Path) -> None:
    """Deletes path, first unmounting what a killed debootstrap left mounted inside (/proc...)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.split()[4].encode().decode("unicode_escape") for ln in f]
    for mount in sorted((m for m in mounts if (m + "/").startswith(prefix)), reverse=True):
        if subprocess.run(["umount", "-l", mount], capture_output=True).returncode:
            raise ImageUnavailable(f"cannot unmount {mount}; not deleting {path}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

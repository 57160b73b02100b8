"""The workspace image, for real: a Docker engine, debootstrap and a Debian mirror.

Building takes a minute or two, so the session builds the default image at most once (fixture
`workspace_image`: a no-op when the engine has it from the current recipe) and every test reuses
it. A build into a throwaway tag, with two concurrent callers, runs only when
FORGELINE_TEST_IMAGE_BUILD=1 (or when the default image was absent: the fixture built it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import tarfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import pytest
from aiodocker.exceptions import DockerError

from forgeline.image_commands import cache_dir
from forgeline.settings import Settings
from handlers.workspaces.image import (
    NAME_LABEL,
    RECIPE,
    RECIPE_LABEL,
    ImageUnavailable,
    ensure_image,
    image_info,
    mirror_from_apt,
)

BUILD_TIMEOUT = pytest.mark.timeout(1200)


@dataclass
class BuiltImage:
    name: str
    was_present: bool
    seconds: float
    progress: list[str]


@pytest.fixture(scope="session")
async def docker() -> AsyncIterator[aiodocker.Docker]:
    """A client of the Docker engine; skips (fails under CI=true) when none answers."""
    try:
        client = aiodocker.Docker(url=Settings().docker_url)
    except (ValueError, AssertionError) as exc:  # aiodocker found no socket
        _no_engine(exc)
    try:
        async with asyncio.timeout(10):
            await client.version()
    except (DockerError, TimeoutError, OSError) as exc:
        await client.close()
        _no_engine(exc)
    yield client
    await client.close()


def _no_engine(exc: Exception) -> None:
    message = f"no Docker engine answers ({exc}): run scripts/ensure-docker.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
async def workspace_image(docker: aiodocker.Docker) -> BuiltImage:
    """The default workspace image (settings.workspace_image), built once if absent or stale."""
    settings = Settings()
    before = await image_info(docker, settings.workspace_image)
    lines: list[str] = []
    started = time.monotonic()
    name = await ensure_image(
        docker,
        settings.workspace_image,
        mirror=settings.debian_mirror,
        progress=lines.append,
        cache_dir=cache_dir(settings),
    )
    return BuiltImage(name, before["state"] == "fresh", time.monotonic() - started, lines)


async def _run(docker: aiodocker.Docker, image: str, script: str, **config: object) -> str:
    """Runs script with sh in a new container of image (no network); its output."""
    container = await docker.containers.run(
        {"Image": image, "Cmd": ["sh", "-c", script], "NetworkDisabled": True, **config}
    )
    try:
        async with asyncio.timeout(60):
            status = await container.wait()
            output = "".join(await container.log(stdout=True, stderr=True))
        assert status["StatusCode"] == 0, output
        return output
    finally:
        await container.delete(force=True)


async def _tiny_image(docker: aiodocker.Docker, tag: str, labels: dict[str, str]) -> None:
    """An image of one file, built offline (FROM scratch), with these labels."""
    dockerfile = "FROM scratch\nCOPY hello /hello\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [("Dockerfile", dockerfile.encode()), ("hello", b"hi\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    await docker.images.build(fileobj=buffer, encoding="identity", tag=tag, labels=labels)


def test_mirror_comes_from_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.invalid/debian bookworm main\n"
        "deb [signed-by=/k.gpg] http://security.invalid/debian-security bookworm-security main\n"
    )
    assert mirror_from_apt("bookworm", tmp_path) is None  # only a -security suite
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src deb\n# a comment\nURIs: http://one.invalid/debian\n"
        "  http://two.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert mirror_from_apt("bookworm", tmp_path) == "http://one.invalid/debian"
    (tmp_path / "sources.list").write_text("deb http://stable.invalid/debian stable main\n")
    assert mirror_from_apt("trixie", tmp_path) == "http://stable.invalid/debian"


def test_recipe_digest_follows_the_recipe() -> None:
    assert len(RECIPE.digest) == 64 and RECIPE.digest == dataclasses.replace(RECIPE).digest
    more = dataclasses.replace(RECIPE, packages=(*RECIPE.packages, "curl"))
    assert more.digest != RECIPE.digest
    assert f"LABEL {RECIPE_LABEL}={RECIPE.digest}" in RECIPE.changes("x/y:z")


@pytest.mark.docker
@BUILD_TIMEOUT
async def test_default_image_is_ready_and_reused(
    docker: aiodocker.Docker, workspace_image: BuiltImage
) -> None:
    settings = Settings()
    assert workspace_image.name == settings.workspace_image
    if not workspace_image.was_present:  # the session built it: debootstrap ran, then import
        assert any("debootstrap" in line for line in workspace_image.progress)
        assert any(
            line.startswith("  I: Base system installed") for line in workspace_image.progress
        ), workspace_image.progress[-10:]
    lines: list[str] = []
    started = time.monotonic()
    again = await ensure_image(
        docker,
        settings.workspace_image,
        mirror=None,
        progress=lines.append,
        cache_dir=cache_dir(settings),
    )
    assert time.monotonic() - started < 1.0
    assert (again, lines) == (settings.workspace_image, [])
    assert not list(cache_dir(settings).glob("rootfs-*")), "a build left its rootfs behind"


@pytest.mark.docker
@BUILD_TIMEOUT
async def test_container_runs_git_and_python_as_the_agent(
    docker: aiodocker.Docker, workspace_image: BuiltImage
) -> None:
    output = await _run(
        docker,
        workspace_image.name,
        "git --version; python3 -c 'print(1)'; id -u; id -g; id -un; pwd; echo $HOME; "
        "touch /workspace/x ~/y && git init -q /workspace/r && echo writable",
    )
    lines = output.split()
    assert output.startswith("git version 2."), output
    assert lines[3:9] == ["1", "1000", "1000", "agent", "/workspace", "/home/agent"], output
    assert lines[-1] == "writable"
    as_root = await _run(docker, workspace_image.name, "id -u", User="root")
    assert as_root.strip() == "0"  # the default user is the agent; root must be asked for


@pytest.mark.docker
@BUILD_TIMEOUT
async def test_image_info_reports_the_image(
    docker: aiodocker.Docker, workspace_image: BuiltImage
) -> None:
    info = await image_info(docker, workspace_image.name)
    assert info["present"] and info["state"] == "fresh"
    assert str(info["id"]).startswith("sha256:")
    # Debian (about 200 MB) and the agent CLIs (about 1.2 GB: docs/workspace-image.md).
    assert 50e6 < info["size"] < 2e9, info["size"]
    assert info["created"] and info["recipe_label"] == info["recipe"] == RECIPE.digest
    absent = await image_info(docker, f"forgeline/test-absent:{uuid.uuid4().hex[:12]}")
    assert (absent["present"], absent["state"], absent["id"]) == (False, "absent", None)


@pytest.mark.docker
async def test_own_and_stale_images_are_told_apart(
    docker: aiodocker.Docker, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:12]
    own, derived, stale = (f"forgeline/test-{kind}:{tag}" for kind in ("own", "derived", "stale"))
    await _tiny_image(docker, own, {})
    await _tiny_image(docker, derived, {RECIPE_LABEL: "old", NAME_LABEL: "forgeline/other:1"})
    await _tiny_image(docker, stale, {RECIPE_LABEL: "old", NAME_LABEL: stale})
    try:
        assert (await image_info(docker, own))["state"] == "foreign"
        assert (await image_info(docker, derived))["state"] == "foreign"
        assert (await image_info(docker, stale))["state"] == "stale"
        lines: list[str] = []
        assert (
            await ensure_image(
                docker,
                own,
                mirror="http://127.0.0.1:9/debian",
                progress=lines.append,
                cache_dir=tmp_path,
            )
            == own
        )
        assert lines == []  # your own image is used as it is: no pull, no build
    finally:
        for image in (own, derived, stale):
            await docker.images.delete(image, force=True)


@pytest.mark.docker
async def test_unreachable_mirror_fails_clearly_and_cleans_up(
    docker: aiodocker.Docker, tmp_path: Path
) -> None:
    image = f"forgeline/test-workspace:{uuid.uuid4().hex[:12]}"
    lines: list[str] = []
    with pytest.raises(ImageUnavailable, match="FORGELINE_DEBIAN_MIRROR"):
        await ensure_image(
            docker,
            image,
            mirror="http://127.0.0.1:9/debian",
            progress=lines.append,
            cache_dir=tmp_path,
        )
    assert any(line.startswith("not pulled") for line in lines), lines
    assert not list(tmp_path.glob("rootfs-*"))
    assert not (await image_info(docker, image))["present"]


@pytest.mark.docker
@BUILD_TIMEOUT
@pytest.mark.skipif(
    os.environ.get("FORGELINE_TEST_IMAGE_BUILD") != "1",
    reason="a second full build; FORGELINE_TEST_IMAGE_BUILD=1 runs it",
)
async def test_two_callers_build_an_absent_image_once(
    docker: aiodocker.Docker, tmp_path: Path
) -> None:
    image = f"forgeline/test-workspace:{uuid.uuid4().hex[:12]}"
    first: list[str] = []
    second: list[str] = []
    try:
        refs = await asyncio.gather(
            *(
                ensure_image(
                    docker,
                    image,
                    mirror=Settings().debian_mirror,
                    progress=lines.append,
                    cache_dir=tmp_path / "cache",
                )
                for lines in (first, second)
            )
        )
        assert refs == [image, image]
        phases = [line for line in first + second if line.startswith("debootstrap ")]
        assert len(phases) == 1, phases  # the other caller waited on the lock, then reused it
        assert (await image_info(docker, image))["state"] == "fresh"
        assert (await _run(docker, image, "id -u")).strip() == "1000"
        assert not list((tmp_path / "cache").glob("rootfs-*"))
    finally:
        with contextlib.suppress(DockerError):
            await docker.images.delete(image, force=True)

"""The agent CLIs of the workspace image, with every version pinned here and only here.

Codex and Claude Code come from the npm registry, installed with the building host's `npm`
(both packages are launchers around a native binary, so the image needs no Node.js: the
binaries are linked into /usr/local/bin). mini-swe-agent comes from PyPI: the host's pip
downloads the wheels of a full lock (every package pinned, no dependency resolution, so two
builds get the same code), and the image's own python3 installs them into a venv (chroot).

mini-swe-agent's lock leaves out `datasets` (and pyarrow, pandas, numpy, which only it pulls
in): mini needs it only for SWE-bench batch runs, never for `mini` on one task, and it would
add about 300 MB. `mcp` is in: litellm imports it (DESIGN.md's pitfalls).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from handlers.workspaces.base import WorkspaceError

Progress = Callable[[str], None]

NPM_PACKAGES: tuple[tuple[str, str], ...] = (
    ("@openai/codex", "0.169.0"),
    ("@anthropic-ai/claude-code", "2.1.330"),
)
MINI_SWE_AGENT_VERSION = "2.4.6"
MINI_SWE_AGENT_LOCK: tuple[str, ...] = (
    *("aiohappyeyeballs==2.7.1", "aiohttp==3.14.5", "aiosignal==1.4.0", "annotated-doc==0.0.7"),
    *("annotated-types==0.8.0", "anyio==4.16.0", "attrs==26.1.0", "boto3==1.44.5"),
    *("botocore==1.44.5", "certifi==2026.10.18", "cffi==2.1.1", "charset-normalizer==3.5.2"),
    *("click==8.5.1", "cryptography==50.0.2", "distro==1.9.0", "fastuuid==0.14.0"),
    *("filelock==3.32.7", "frozenlist==1.8.0", "fsspec==2026.9.0", "h11==0.16.0", "h2==4.4.1"),
    *("hf-xet==1.8.0", "hpack==4.2.0", "httpcore==1.0.9", "httpcore2==2.16.2", "httpx==0.28.1"),
    *("httpx2==2.16.2", "huggingface_hub==1.33.0", "hyperframe==6.1.0", "idna==3.20"),
    *("importlib_metadata==8.9.0", "Jinja2==3.1.6", "jiter==0.19.0", "jmespath==1.1.0"),
    *("jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "linkify-it-py==2.2.0"),
    *("litellm==1.106.2", "markdown-it-py==4.3.0", "MarkupSafe==3.0.4", "mcp==2.3.0"),
    *("mcp-types==2.3.0", "mdit-py-plugins==0.7.0", "mdurl==0.1.2"),
    f"mini-swe-agent=={MINI_SWE_AGENT_VERSION}",
    *("multidict==7.2.1", "openai==2.54.0", "opentelemetry-api==1.45.2", "packaging==26.3"),
    *("platformdirs==4.14.7", "prompt_toolkit==3.0.53", "propcache==0.5.4", "pycparser==3.12"),
    *("pydantic==2.14.3", "pydantic-settings==2.16.3", "pydantic_core==2.50.4"),
    *("Pygments==2.21.0", "PyJWT==2.15.1", "python-dateutil==2.9.0.post0"),
    *("python-dotenv==1.2.4", "python-multipart==0.0.34", "PyYAML==6.0.3"),
    *("referencing==0.37.0", "regex==2026.11.15", "requests==2.34.2", "rich==15.0.0"),
    *("rpds-py==2026.9.1", "s3transfer==0.19.3", "shellingham==1.5.4", "six==1.17.0"),
    *("sniffio==1.3.1", "sse-starlette==3.7.0", "starlette==1.10.0", "tenacity==9.2.1"),
    *("textual==8.2.8", "tiktoken==0.14.0", "tokenizers==0.23.3", "tqdm==4.70.1"),
    *("truststore==0.10.5", "typer==0.29.2", "typing-inspection==0.4.5"),
    *("typing_extensions==4.16.0", "urllib3==2.8.0", "uvicorn==0.54.0", "wcwidth==0.9.4"),
    *("yarl==1.25.1", "zipp==4.1.2"),
)

# Where they live in the image.
NPM_PREFIX = "/opt/forgeline/npm"
MSWEA_VENV = "/opt/mswea"
INSTALL_TIMEOUT_S = 1200.0


def _codex_triple() -> tuple[str, str]:
    """(npm platform package suffix, Rust target) of the codex binary for this machine."""
    return (
        ("arm64", "aarch64-unknown-linux-musl")
        if platform.machine()
        in (
            "aarch64",
            "arm64",
        )
        else ("x64", "x86_64-unknown-linux-musl")
    )


def links() -> dict[str, str]:
    """/usr/local/bin entries of the image -> what they point at."""
    suffix, triple = _codex_triple()
    vendor = f"{NPM_PREFIX}/node_modules/@openai/codex-linux-{suffix}/vendor/{triple}"
    return {
        "codex": f"{vendor}/bin/codex",
        "rg": f"{vendor}/codex-path/rg",  # ripgrep, which Codex and Claude Code search with
        "claude": f"{NPM_PREFIX}/node_modules/@anthropic-ai/claude-code/bin/claude.exe",
        "mini": f"{MSWEA_VENV}/bin/mini",
    }


def pinned_tools() -> tuple[str, ...]:
    """What of this module goes into the image recipe (and its digest: a new pin, a new
    image)."""
    return (
        *(f"npm:{name}@{version}" for name, version in NPM_PACKAGES),
        *(f"pypi:{pin}" for pin in MINI_SWE_AGENT_LOCK),
        *(f"link:/usr/local/bin/{name}={target}" for name, target in links().items()),
    )


class ToolInstallFailed(WorkspaceError):
    """An agent CLI could not be installed into the image; the message says why."""


async def install_agent_tools(rootfs: Path, cache_dir: Path, progress: Progress) -> None:
    """Installs the pinned CLIs into a debootstrapped rootfs (needs root, network to the npm
    registry and PyPI). Downloads are cached under cache_dir/{npm,wheels} for the next build."""
    await _npm_install(rootfs, cache_dir / "npm", progress)
    await _pip_install(rootfs, cache_dir / "wheels", progress)
    bin_dir = rootfs / "usr/local/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in links().items():
        if not (rootfs / target.lstrip("/")).exists():
            raise ToolInstallFailed(f"{target} is missing after the install")
        (bin_dir / name).unlink(missing_ok=True)
        (bin_dir / name).symlink_to(target)


async def _npm_install(rootfs: Path, cache: Path, progress: Progress) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise ToolInstallFailed(
            "npm is not installed on this host: it installs Codex and Claude Code into the "
            "image (apt-get install npm; scripts/ensure-docker.sh does it)"
        )
    prefix = rootfs / NPM_PREFIX.lstrip("/")
    prefix.mkdir(parents=True, exist_ok=True)
    packages = [f"{name}@{version}" for name, version in NPM_PACKAGES]
    progress(f"npm install {' '.join(packages)}")
    argv = [npm, "install", "--prefix", str(prefix), "--cache", str(cache)]
    flags = ["--no-save", "--no-audit", "--no-fund", "--no-update-notifier", "--loglevel=warn"]
    # Claude Code's postinstall puts its native binary in place of a stub: scripts must run.
    await run_logged([*argv, *flags, "--foreground-scripts", *packages], os.environ, progress)


async def _pip_install(rootfs: Path, wheels: Path, progress: Progress) -> None:
    """The host's pip downloads the wheels (with the host's pip configuration: index, proxy,
    certificates), the image's own python3 installs them in its venv, offline (chroot)."""
    progress(f"mini-swe-agent {MINI_SWE_AGENT_VERSION}: wheels from PyPI, a venv at {MSWEA_VENV}")
    if importlib.util.find_spec("pip") is None:
        raise ToolInstallFailed(
            f"pip is not installed beside this Python ({sys.executable}): it downloads "
            "mini-swe-agent's wheels for the image (python -m ensurepip)"
        )
    wheels.mkdir(parents=True, exist_ok=True)
    lock = wheels / "requirements.txt"
    lock.write_text("\n".join(MINI_SWE_AGENT_LOCK) + "\n")
    machine = "aarch64" if _codex_triple()[0] == "arm64" else "x86_64"
    # The image's tags whatever the host's Python: CPython 3.11 on glibc (bookworm: 2.36).
    platforms = [f"--platform=manylinux_2_{minor}_{machine}" for minor in range(17, 37)]
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    download += ["--python-version=3.11", "--implementation=cp", "--abi=cp311", *platforms]
    download += ["--disable-pip-version-check", "--progress-bar=off", "--dest", str(wheels)]
    await run_logged([*download, "-r", str(lock)], os.environ, progress)
    inside = rootfs / "tmp/forgeline-wheels"
    wheels.rename(inside)  # same filesystem: instant; the chroot sees the wheels
    try:
        chroot = ["chroot", str(rootfs)]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        env |= {"HOME": "/root", "LANG": "C.UTF-8"}
        await run_logged([*chroot, "python3", "-m", "venv", MSWEA_VENV], env, progress)
        pip = [*chroot, f"{MSWEA_VENV}/bin/pip", "install", "--no-deps", "--no-index"]
        pip += ["--disable-pip-version-check", "--no-input", "--progress-bar=off", "--no-cache-dir"]
        pip += [
            "--find-links=/tmp/forgeline-wheels",
            "-r",
            "/tmp/forgeline-wheels/requirements.txt",
        ]
        await run_logged(pip, env, progress)
    finally:
        inside.rename(wheels)


async def stream_process(
    argv: Sequence[str], env: Mapping[str, str], progress: Progress, timeout_s: float
) -> tuple[int, list[str]]:
    """Runs argv, each output line to progress (indented); returns its exit code and its last
    lines. Past timeout_s (or when cancelled) its whole process group is killed and
    TimeoutError (or the cancellation) is raised."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,
    )
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=8)
    try:
        async with asyncio.timeout(timeout_s):
            async for raw in proc.stdout:
                tail.append(raw.decode(errors="replace").rstrip())
                progress("  " + tail[-1])
            return await proc.wait(), list(tail)
    except BaseException:  # timeout or cancellation: the whole group goes
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        raise


async def run_logged(argv: Sequence[str], env: Mapping[str, str], progress: Progress) -> None:
    """stream_process(); raises ToolInstallFailed with the last lines when argv fails or runs
    over INSTALL_TIMEOUT_S."""
    try:
        code, tail = await stream_process(argv, env, progress, INSTALL_TIMEOUT_S)
    except TimeoutError:
        raise ToolInstallFailed(f"{argv[0]} ran over {INSTALL_TIMEOUT_S:g} s") from None
    if code != 0:
        shown = " ".join(argv[:4])
        raise ToolInstallFailed(f"`{shown} ...` failed (exit {code}): " + " | ".join(tail))

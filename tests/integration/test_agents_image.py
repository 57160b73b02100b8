"""The workspace image carries the agent CLIs at the versions pinned in agent_tools.py, runnable
by the unprivileged agent user without network."""

from __future__ import annotations

import dataclasses

import aiodocker
import pytest

from handlers.workspaces.agent_tools import MINI_SWE_AGENT_VERSION, NPM_PACKAGES, pinned_tools
from handlers.workspaces.image import RECIPE
from tests.integration.test_image import BuiltImage, _run
from tests.integration.test_image import docker as docker
from tests.integration.test_image import workspace_image as workspace_image

pytestmark = pytest.mark.docker


def test_a_new_pin_is_a_new_recipe() -> None:
    assert RECIPE.agent_tools == pinned_tools()
    bumped = dataclasses.replace(RECIPE, agent_tools=(*RECIPE.agent_tools[1:], "npm:x@1"))
    assert bumped.digest != RECIPE.digest


async def test_the_agent_clis_run_as_the_agent_at_their_pinned_versions(
    docker: aiodocker.Docker,
    workspace_image: BuiltImage,
) -> None:
    script = (
        "id -u; codex --version; claude --version; rg --version | head -1;"
        " /opt/mswea/bin/python -c 'import importlib.metadata as m;"
        ' print("mini-swe-agent", m.version("mini-swe-agent"))\';'
        " MSWEA_CONFIGURED=true MSWEA_SILENT_STARTUP=1 mini --help >/dev/null && echo mini-ok;"
        " command -v node || echo no-node"
    )
    output = await _run(docker, workspace_image.name, script)
    lines = output.splitlines()
    versions = dict(NPM_PACKAGES)
    assert lines[0] == "1000"
    assert f"codex-cli {versions['@openai/codex']}" in lines
    assert any(line.startswith(versions["@anthropic-ai/claude-code"]) for line in lines), lines
    assert any(line.startswith("ripgrep ") for line in lines), lines
    assert f"mini-swe-agent {MINI_SWE_AGENT_VERSION}" in lines
    assert "mini-ok" in lines
    assert lines[-1] == "no-node"  # the CLIs are native binaries: no Node.js needed

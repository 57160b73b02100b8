"""The LLM proxy's settings: keys stay secret, prices parse, each worker gets its socket folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeline.llm_proxy import _socket_dir, describe, proxy_config
from forgeline.settings import Settings

KEY = "sk-settings-test-0123456789"


def test_keys_are_secret_and_a_provider_without_one_is_not_offered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORGELINE_LLM_OPENAI_API_KEY", KEY)
    monkeypatch.setenv("FORGELINE_LLM_PRICES", '{"my-model": [1.5, 6]}')
    settings = Settings()
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    config = proxy_config(settings)
    assert config.openai is not None and config.openai.api_key == KEY
    assert KEY not in repr(config)
    assert config.anthropic is None
    assert config.prices.per_million("my-model-2") == (1.5, 6.0)
    assert describe(config) == "openai at https://api.openai.com/v1"


def test_each_worker_gets_a_short_socket_folder_of_its_own(tmp_path: Path) -> None:
    shared = tmp_path / "llm"
    a = _socket_dir(Settings(llm_proxy_socket_dir=shared, worker_name="host-1/../x"))
    b = _socket_dir(Settings(llm_proxy_socket_dir=shared, worker_name="host-2"))
    assert a.parent == b.parent == shared and a != b and a.is_dir()
    assert a.name == "host-1_.._x"  # no way out of the shared folder
    assert _socket_dir(Settings(llm_proxy_socket_dir=shared, worker_name="..")).parent == shared
    fresh = _socket_dir(Settings())
    try:
        assert str(fresh).startswith("/tmp/fl-llm-") and len(str(fresh / "llm.sock")) < 100
    finally:
        fresh.rmdir()

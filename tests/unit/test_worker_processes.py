"""How a worker's slots are spread over its processes, and what each extra process is told."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forgeline.settings import Settings
from forgeline.worker_processes import PARENT_PID_ENV, extra_workers, own_slots, slot_shares


@pytest.mark.parametrize(
    ("slots", "processes", "shares"),
    [(4, 1, [4]), (4, 2, [2, 2]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]), (3, 3, [1, 1, 1])],
)
def test_slots_are_spread_evenly_and_add_up(slots: int, processes: int, shares: list[int]) -> None:
    assert slot_shares(slots, processes) == shares


def test_each_extra_worker_has_its_own_name_slots_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        worker_name="w", worker_slots=5, worker_processes=3, data_dir=tmp_path, metrics_port=9100
    )
    assert own_slots(settings) == 2
    extras = extra_workers(settings)
    assert [(e.name, e.slots, e.data_dir) for e in extras] == [
        ("w-2", 2, tmp_path / "workers" / "2"),
        ("w-3", 1, tmp_path / "workers" / "3"),
    ]
    env = extras[0].environment({"FORGELINE_PORT": "8081"}, "nats://n:1", "postgresql://p/db")
    assert env[PARENT_PID_ENV].isdigit()
    for key in list(os.environ):
        if key.startswith("FORGELINE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    child = Settings()  # what the extra process reads
    assert (child.worker_name, child.worker_slots, child.worker_processes) == ("w-2", 2, 1)
    assert (child.nats_url, child.database_url) == ("nats://n:1", "postgresql://p/db")
    assert child.workspaces_dir == tmp_path / "workers" / "2" / "workspaces"
    # This process's ports stay its own; the rest of its environment is passed on.
    assert (child.metrics_port, child.llm_proxy_port, child.port) == (None, 0, 8081)


def test_more_worker_processes_than_slots_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="every worker process needs a slot"):
        Settings(worker_processes=3, worker_slots=2)

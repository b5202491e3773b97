"""The cyclic collector is paused across a load's or save's planning and always comes back on."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

import dcpio
from dcpio._runtime import GcPause, gc_paused, pauses_held


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    # a pause left by an earlier test whose load failed inside torch's planning ends by itself within 5 s
    deadline = time.monotonic() + 10
    while pauses_held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pauses_held() == 0
    gc.enable()
    yield
    gc.enable()


class _SeeingSavePlanner(DefaultSavePlanner):
    seen: list[bool]

    def create_global_plan(self, all_plans: Any) -> Any:
        type(self).seen.append(gc.isenabled())
        return super().create_global_plan(all_plans)


class _SeeingLoadPlanner(DefaultLoadPlanner):
    seen: list[bool]

    def create_global_plan(self, global_plan: Any) -> Any:
        type(self).seen.append(gc.isenabled())
        return super().create_global_plan(global_plan)


@pytest.mark.parametrize("pause", ["1", "0"])
def test_planning_runs_with_the_collector_paused_and_it_is_back_on_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pause: str
) -> None:
    monkeypatch.setenv("DCPIO_PAUSE_GC", pause)
    _SeeingSavePlanner.seen, _SeeingLoadPlanner.seen = [], []
    state = {"w": torch.randn(64, 64), "step": 3}
    dcp.save(state, storage_writer=dcpio.FileSystemWriter(tmp_path), planner=_SeeingSavePlanner())
    assert gc.isenabled()
    target = {"w": torch.zeros(64, 64), "step": 0}
    dcp.load(target, storage_reader=dcpio.FileSystemReader(tmp_path), planner=_SeeingLoadPlanner())
    assert gc.isenabled()
    assert torch.equal(target["w"], state["w"]) and target["step"] == 3
    paused = pause == "1"
    assert _SeeingSavePlanner.seen == [not paused]
    assert _SeeingLoadPlanner.seen == [not paused]


def test_a_load_that_fails_inside_the_engine_turns_the_collector_back_on(tmp_path: Path) -> None:
    dcp.save({"w": torch.randn(256, 256)}, storage_writer=dcpio.FileSystemWriter(tmp_path))
    data_file = next(p for p in tmp_path.iterdir() if p.name.endswith(".distcp"))
    data_file.write_bytes(data_file.read_bytes()[:1000])
    with pytest.raises(BaseException, match="truncated"):
        dcp.load({"w": torch.zeros(256, 256)}, storage_reader=dcpio.FileSystemReader(tmp_path))
    assert gc.isenabled()


def test_a_pause_nobody_releases_ends_by_itself() -> None:
    pause = GcPause(limit=0.2)
    assert not gc.isenabled()
    deadline = time.monotonic() + 10
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gc.isenabled()
    pause.release()  # a late release is harmless
    assert gc.isenabled()


def test_overlapping_pauses_re_enable_only_when_the_last_ends() -> None:
    first = GcPause()
    with gc_paused():
        second = GcPause()
        first.release()
        assert not gc.isenabled()
    assert not gc.isenabled()
    second.release()
    assert gc.isenabled()


def test_a_collector_the_user_turned_off_stays_off() -> None:
    gc.disable()
    pause = GcPause()
    pause.release()
    assert not gc.isenabled()

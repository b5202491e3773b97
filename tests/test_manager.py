"""CheckpointManager on local storage: steps, latest, load, retention, leftovers, commit-once, async saves in
flight (KempnerForge#102's sequence), 2 gloo ranks with disagreeing views, and the ``ls`` / ``prune`` commands."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dcpio
from dcpio.cli.main import EXIT_OK, main
from dcpio.manager import policy
from dcpio.manager.tiers import Tier, step_name
from helpers import bitwise_equal, spawn_ranks


def state_for(step: int, rank: int = 0) -> dict[str, Any]:
    """Deterministic content of ``step`` (distinct per rank, so each rank's keys are its own)."""
    gen = torch.Generator().manual_seed(7919 * step + rank)
    return {
        f"w{rank}": torch.randn(64, 48, generator=gen),
        f"b{rank}": torch.randint(-(2**40), 2**40, (100,), generator=gen),
        "step": step,
    }


def blank_for(rank: int = 0) -> dict[str, Any]:
    return {f"w{rank}": torch.zeros(64, 48), f"b{rank}": torch.zeros(100, dtype=torch.int64), "step": -1}


def assert_state(got: dict[str, Any], step: int, rank: int = 0) -> None:
    want = state_for(step, rank)
    assert got["step"] == step
    for key in (f"w{rank}", f"b{rank}"):
        assert bitwise_equal(got[key], want[key]), (key, step)


def dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---------------------------------------------------------------------------------------------- policy (pure)
def test_retained_examples() -> None:
    assert sorted(policy.retained([1, 2, 3, 4, 5], keep_last=2, keep_every=None)) == [4, 5]
    assert sorted(policy.retained([100, 200, 300, 400, 500], keep_last=1, keep_every=200)) == [200, 400, 500]
    assert sorted(policy.retained([3, 5, 7], keep_last=None, keep_every=4)) == [7]  # the newest always stays
    assert sorted(policy.retained([3, 5, 7], keep_last=None, keep_every=None)) == [3, 5, 7]
    assert policy.retained([], keep_last=1, keep_every=None) == set()


@given(
    st.sets(st.integers(0, 10_000), max_size=40),
    st.one_of(st.none(), st.integers(1, 10)),
    st.one_of(st.none(), st.integers(1, 500)),
)
def test_retained_properties(steps: set[int], keep_last: int | None, keep_every: int | None) -> None:
    kept = policy.retained(steps, keep_last, keep_every)
    assert kept <= steps
    if steps:
        assert max(steps) in kept
    newest = sorted(steps)[-keep_last:] if keep_last else []
    assert set(newest) <= kept
    if keep_every:
        assert {s for s in steps if s % keep_every == 0} <= kept
    if keep_last or keep_every:
        assert len(kept) <= (keep_last or 0) + len([s for s in steps if keep_every and s % keep_every == 0]) + 1
    assert sorted(steps - kept) == policy.to_delete(steps, keep_last, keep_every)


def test_leftovers_respect_grace_and_busy() -> None:
    now = 10_000.0
    stale = {1: now - 100, 2: now - 5, 3: now - 100}
    assert policy.leftovers(stale, now, 60, busy={3}) == [1]
    assert policy.leftovers(stale, now, 0, busy=()) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- one process
def test_save_steps_latest_load_and_retention(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = dcpio.CheckpointManager(root, keep_last=2, keep_every=3)
    assert mgr.steps() == [] and mgr.latest() is None
    with pytest.raises(FileNotFoundError):
        mgr.load(blank_for())
    for step in range(1, 8):
        mgr.save(step, state_for(step))
    assert mgr.steps() == [3, 6, 7] and mgr.latest() == 7
    assert dirs(root) == [step_name(3), step_name(6), step_name(7)]
    got = blank_for()
    assert mgr.load(got) == 7
    assert_state(got, 7)
    assert mgr.load(got, step=3) == 3
    assert_state(got, 3)
    with pytest.raises(dcpio.IncompleteCheckpointError, match="step 4 is not committed"):
        mgr.load(got, step=4)
    with pytest.raises(dcpio.CheckpointExistsError, match="step 7 is already committed"):
        mgr.save(7, state_for(8))
    assert_state(_load_fresh(root, 7), 7)  # the refused save changed nothing
    mgr.close()


def _load_fresh(root: Path, step: int | None = None) -> dict[str, Any]:
    got = blank_for()
    dcpio.CheckpointManager(root).load(got, step=step)
    return got


def test_uncommitted_steps_are_not_listed_and_swept_after_grace(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = dcpio.CheckpointManager(root, keep_last=5, leftover_grace_s=60)
    for step in (1, 2):
        mgr.save(step, state_for(step))
    # step 3: a save that wrote its data and never committed (its .metadata gone, as after a kill before it)
    mgr.save(3, state_for(3))
    os.unlink(root / step_name(3) / ".metadata")
    # step 9: a directory a save is still filling (fresh mtime)
    (root / step_name(9)).mkdir()
    (root / step_name(9) / "__0_0.abcdef12.distcp").write_bytes(b"x" * 100)
    assert mgr.steps() == [1, 2] and mgr.latest() == 2
    mgr.cleanup()
    assert dirs(root) == [step_name(s) for s in (1, 2, 3, 9)]  # both younger than the grace period
    old = time.time() - 3600
    for path in [root / step_name(3), *(root / step_name(3)).iterdir()]:
        os.utime(path, (old, old))
    mgr.cleanup()
    assert dirs(root) == [step_name(s) for s in (1, 2, 9)]
    got = blank_for()
    assert mgr.load(got) == 2
    assert_state(got, 2)


def test_commit_is_written_once(tmp_path: Path) -> None:
    mgr = dcpio.CheckpointManager(tmp_path / "run")
    mgr.save(1, state_for(1))
    tier = Tier(tmp_path / "run", name="durable")
    original = (tmp_path / "run" / step_name(1) / ".metadata").read_bytes()
    with pytest.raises(dcpio.CheckpointExistsError, match="committed by another save"):
        tier.commit(1, b"a second writer's metadata")
    assert (tmp_path / "run" / step_name(1) / ".metadata").read_bytes() == original
    assert [p.name for p in (tmp_path / "run" / step_name(1)).iterdir() if p.name.endswith(".tmp")] == []
    assert_state(_load_fresh(tmp_path / "run", 1), 1)


def test_corrupt_local_copy_falls_back_to_durable(tmp_path: Path) -> None:
    mgr = dcpio.CheckpointManager(tmp_path / "durable", local_root=tmp_path / "local")
    mgr.save(1, state_for(1))
    mgr.wait()
    data = next((tmp_path / "local" / step_name(1)).glob("*.distcp"))
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    data.write_bytes(bytes(blob))
    got = blank_for()
    with pytest.warns(UserWarning, match="loading from the local tier failed"):
        assert mgr.load(got) == 1
    assert_state(got, 1)
    mgr.close()


class Gate:
    """A value whose pickling (in the background writer) waits until the test opens the gate."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __deepcopy__(self, memo: Any) -> Gate:
        return Gate(self.event)  # staging copies it on the caller's thread: must not block there

    def __reduce_ex__(self, protocol: Any) -> Any:
        if not self.event.wait(120):
            raise TimeoutError("the test never opened the gate")
        return (dict, ())


@pytest.mark.parametrize("two_tiers", [False, True])
def test_async_save_in_flight_never_loses_the_durable_step(tmp_path: Path, two_tiers: bool) -> None:
    # KempnerForge#102: latest advanced and keep-last-N ran before the async save was durable, deleting the only
    # good checkpoint. Here the save of step 2 is held in flight while everything that could do that runs.
    root = tmp_path / "durable"
    local = tmp_path / "local" if two_tiers else None
    mgr = dcpio.CheckpointManager(root, keep_last=1, local_root=local, leftover_grace_s=0)
    mgr.save(1, state_for(1))
    mgr.wait()
    gate = threading.Event()
    future = mgr.async_save(2, {**state_for(2), "gate": Gate(gate)})
    try:
        time.sleep(0.2)  # not a timing assertion: only gives the background save time to get stuck at the gate
        assert not future.done()
        assert mgr.latest() == 1 and mgr.steps() == [1]
        mgr.cleanup()  # retention and a grace-0 sweep while step 2 is in flight
        assert step_name(1) in dirs(root) and step_name(2) in dirs(local or root)
        assert_state(_load_fresh(root, None), 1)
    finally:
        gate.set()
    future.result()
    mgr.wait()
    assert mgr.steps() == [2] and dirs(root) == [step_name(2)]
    got = blank_for()
    assert mgr.load(got) == 2
    assert_state(got, 2)
    mgr.close()


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_ls_and_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    mgr = dcpio.CheckpointManager(root)
    for step in (1, 2, 3, 4):
        mgr.save(step, state_for(step))
    os.unlink(root / step_name(2) / ".metadata")
    assert main(["ls", "--json", str(root)]) == EXIT_OK
    listed = {(i["step"], i["committed"]) for i in json.loads(capsys.readouterr().out)}
    assert listed == {(1, True), (2, False), (3, True), (4, True)}
    assert main(["ls", str(root)]) == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["step", "tier", "committed"] and table[2].split()[:3] == ["2", "durable", "NO"]

    assert main(["prune", str(root), "--keep", "1", "--grace", "0", "--dry-run"]) == EXIT_OK
    assert "would delete 2 committed step(s): 1, 3" in capsys.readouterr().out
    assert dirs(root) == [step_name(s) for s in (1, 2, 3, 4)]
    assert main(["prune", str(root), "--keep", "1", "--grace", "0"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "deleted 2 committed step(s): 1, 3" in out and "deleted 1 uncommitted leftover(s): 2" in out
    assert dirs(root) == [step_name(4)]
    assert_state(_load_fresh(root), 4)
    assert main(["prune", str(root), "--keep", "0"]) == 2


# ---------------------------------------------------------------------------------------------- 2 gloo ranks
def rank_save_retention(rank: int, world: int, root: str, local: str | None) -> None:
    mgr = dcpio.CheckpointManager(root, keep_last=2, local_root=local, leftover_grace_s=0)
    for step in range(1, 5):
        if step % 2:
            mgr.async_save(step, state_for(step, rank))
        else:
            mgr.save(step, state_for(step, rank))
    mgr.wait()
    steps = mgr.steps()
    got = blank_for(rank)
    loaded = mgr.load(got)
    assert_state(got, 4, rank)
    mgr.close()
    print(json.dumps({"steps": steps, "loaded": loaded}))


@pytest.mark.slow
@pytest.mark.parametrize("two_tiers", [False, True])
def test_two_ranks_save_retention_load(tmp_path: Path, two_tiers: bool) -> None:
    root, local = tmp_path / "run", (str(tmp_path / "local") if two_tiers else None)
    outs = spawn_ranks(2, "test_manager:rank_save_retention", [str(root), local], tmp_path)
    for out in outs:
        assert json.loads(out.strip().splitlines()[-1]) == {"steps": [3, 4], "loaded": 4}
    assert dirs(root) == [step_name(3), step_name(4)]
    names = sorted(p.name for p in (root / step_name(4)).iterdir())
    assert names[0] == ".metadata" and {n[:3] for n in names[1:]} == {"__0", "__1"}  # both ranks' files
    if local:
        assert dirs(Path(local)) == [step_name(4)]


def rank_views_disagree(rank: int, world: int, real: str, view: str) -> None:
    import torch.distributed as dist

    # rank 1 looks at the run through a view that lags: it does not see step 3 yet (an NFS client's stale listing)
    root = real if rank == 0 else view
    mgr = dcpio.CheckpointManager(root, keep_last=2)
    own_view = sorted(int(p.name[5:]) for p in Path(root).iterdir() if (p / ".metadata").exists())
    steps, latest = mgr.steps(), mgr.latest()
    mgr.cleanup()  # deletes step 1 on rank 0's decision; rank 1 would have kept it and called step 2 the newest
    after = mgr.steps()
    dist.barrier()
    if rank == 1:
        os.symlink(os.path.join(real, step_name(3)), os.path.join(view, step_name(3)))  # the view catches up
    dist.barrier()
    got = blank_for(rank)
    loaded = mgr.load(got)
    assert_state(got, 3, rank)
    print(json.dumps({"own_view": own_view, "steps": steps, "latest": latest, "after": after, "loaded": loaded}))


def rank_write_three(rank: int, world: int, real: str) -> None:
    mgr = dcpio.CheckpointManager(real)
    for step in (1, 2, 3):
        mgr.save(step, state_for(step, rank))


@pytest.mark.slow
def test_two_ranks_decide_once_when_views_disagree(tmp_path: Path) -> None:
    real, view = tmp_path / "real", tmp_path / "view"
    spawn_ranks(2, "test_manager:rank_write_three", [str(real)], tmp_path)
    view.mkdir()
    for step in (1, 2):
        os.symlink(real / step_name(step), view / step_name(step))
    outs = [
        json.loads(o.strip().splitlines()[-1])
        for o in spawn_ranks(2, "test_manager:rank_views_disagree", [str(real), str(view)], tmp_path)
    ]
    assert outs[0]["own_view"] == [1, 2, 3] and outs[1]["own_view"] == [1, 2]  # the views really differ
    for out in outs:
        assert out["steps"] == [1, 2, 3] and out["latest"] == 3 and out["after"] == [2, 3] and out["loaded"] == 3
    assert dirs(real) == [step_name(2), step_name(3)]


def test_damaged_metadata_is_not_committed_and_not_swept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    mgr = dcpio.CheckpointManager(root, keep_last=1, leftover_grace_s=0)
    mgr.save(1, state_for(1))
    mgr.save(2, state_for(2))
    meta = root / step_name(2) / ".metadata"
    meta.write_bytes(meta.read_bytes()[:40])  # committed once, damaged later
    old = time.time() - 3600
    for path in [root / step_name(2), *(root / step_name(2)).iterdir()]:
        os.utime(path, (old, old))
    mgr.cleanup()
    assert mgr.steps() == [] and dirs(root) == [step_name(2)]  # step 1 went when 2 committed; 2 is left to recover
    assert main(["ls", str(root)]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["2", "durable", "DAMAGED"]
    assert main(["ls", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_file_url_root_commits_once(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/run"
    mgr = dcpio.CheckpointManager(url, keep_last=1)
    mgr.save(1, state_for(1))
    mgr.save(2, state_for(2))
    assert mgr.steps() == [2] and dirs(tmp_path / "run") == [step_name(2)]
    with pytest.raises(dcpio.CheckpointExistsError, match="committed by another save"):
        Tier(url, name="durable").commit(2, b"a second writer's metadata")
    got = blank_for()
    assert mgr.load(got) == 2
    assert_state(got, 2)

"""SIGKILL at random moments of a CheckpointManager's saves, retention, sweeps and uploads, many times.

A child process saves step after step (sync and async alternating) with a local tier and a durable tier, with
retention and a zero grace period, so a kill lands in a save, a deletion, a sweep or an upload. After each kill:
every step that looks committed in either tier loads bit for bit, nothing that was reported saved is lost, and once
the next save completes the durable tier holds exactly what the retention rule keeps and no leftovers.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import dcpio
from dcpio.manager import policy
from dcpio.manager.tiers import Tier
from helpers import TESTS_DIR, bitwise_equal
from test_manager import assert_state, blank_for, state_for

KEEP_LAST, KEEP_EVERY = 2, 4
_PAD = 1_500_000  # int64 elements: 12 MB per step, so a kill often lands inside a write or an upload


def full_state(step: int, ranks: int = 1) -> dict[str, Any]:
    """What every rank of a ``ranks``-rank job saves at ``step``, merged (each rank's keys are its own)."""
    out: dict[str, Any] = {}
    for rank in range(ranks):
        out.update(state_for(step, rank))
        out[f"pad{rank}"] = torch.arange(_PAD, dtype=torch.int64) * (step + 1) + rank
    return out


def rank_state(step: int, rank: int) -> dict[str, Any]:
    return {**state_for(step, rank), f"pad{rank}": torch.arange(_PAD, dtype=torch.int64) * (step + 1) + rank}


def manager(durable: Path, local: Path) -> dcpio.CheckpointManager:
    return dcpio.CheckpointManager(
        durable, keep_last=KEEP_LAST, keep_every=KEEP_EVERY, local_root=local, leftover_grace_s=0
    )


def _child(durable: str, local: str, first: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if "MASTER_PORT" in os.environ:
        import datetime

        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
            rank=rank,
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=datetime.timedelta(seconds=120),
        )
    mgr = manager(Path(durable), Path(local))
    print("ready", flush=True)
    step = int(first)
    while True:
        if step % 2:
            mgr.async_save(step, rank_state(step, rank)).result()
        else:
            mgr.save(step, rank_state(step, rank))
        print("saved", step, flush=True)
        step += 1


def committed(root: Path) -> dict[int, bool]:
    tier = Tier(root, name="t")
    return {s: tier.committed(scan) for s, scan in tier.scan().items()}


def check_loads(root: Path, steps: list[int], ranks: int) -> None:
    mgr = dcpio.CheckpointManager(root)  # no retention: only reads
    for step in steps:
        got: dict[str, Any] = {}
        for rank in range(ranks):
            got.update({**blank_for(rank), f"pad{rank}": torch.zeros(_PAD, dtype=torch.int64)})
        assert mgr.load(got, step=step) == step
        want = full_state(step, ranks)
        for rank in range(ranks):
            assert_state(got, step, rank)
            assert bitwise_equal(got[f"pad{rank}"], want[f"pad{rank}"]), (step, rank)


def _run_and_kill(durable: Path, local: Path, first: int, delay: float, ranks: int) -> int:
    """Run the job from ``first``; SIGKILL every rank ``delay`` s after they are ready; return the last step saved."""
    from helpers import free_port

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    if ranks > 1:
        env.update({"MASTER_PORT": str(free_port()), "WORLD_SIZE": str(ranks)})
    cmd = [sys.executable, __file__, str(durable), str(local), str(first)]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r)})
        for r in range(ranks)
    ]
    outs = []
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stderr is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)  # where the kill lands: not a timing assertion
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL, err
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    saved = [int(line.split()[1]) for out in outs for line in out.splitlines() if line.startswith("saved ")]
    return max(saved, default=first - 1)  # a save returns on any rank only after its commit


@pytest.mark.slow
@pytest.mark.parametrize("ranks,rounds", [(1, 8), (2, 5)])
def test_sigkill_during_save_retention_and_upload(tmp_path: Path, ranks: int, rounds: int) -> None:
    durable, local = tmp_path / "durable", tmp_path / "local"
    rng = random.Random(1602 + ranks)
    first = 1
    reported = 0
    for _ in range(rounds):
        reported = max(reported, _run_and_kill(durable, local, first, rng.uniform(0.0, 2.5), ranks))
        tiers = {"durable": committed(durable), "local": committed(local)}
        for root, seen in ((durable, tiers["durable"]), (local, tiers["local"])):
            check_loads(root, sorted(s for s, ok in seen.items() if ok), ranks)
        newest = max((s for seen in tiers.values() for s, ok in seen.items() if ok), default=0)
        assert newest >= reported  # a save that returned is never lost (it may be local only)

        durable_before = {s for s, ok in tiers["durable"].items() if ok}
        # local steps newer than every durable one lost their upload with the job: the next save resumes them
        resumed = {s for s, ok in tiers["local"].items() if ok and s > max(durable_before, default=-1)}
        nxt = max([reported, *tiers["durable"], *tiers["local"]]) + 1
        mgr = manager(durable, local)  # the job restarts on one process, with every rank's keys
        mgr.save(nxt, full_state(nxt, ranks))
        mgr.close()
        after = committed(durable)
        assert all(after.values()), after  # leftovers swept: nothing in flight, grace 0
        assert sorted(after) == sorted(policy.retained(durable_before | resumed | {nxt}, KEEP_LAST, KEEP_EVERY))
        assert committed(local) == {nxt: True}
        check_loads(durable, sorted((resumed & set(after)) | {nxt}), ranks)
        first = nxt + 1


# ---------------------------------------------------------------------------------------------- a rank dies
_BIG = 25_000_000  # int64 elements: 200 MB on the dying rank, so its upload is far from done when it dies


def _dying_rank(durable: str, local: str) -> None:
    """Rank 1 SIGKILLs itself right after step 2 committed locally; rank 0 reports what the durable tier holds."""
    import datetime
    import json

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    mgr = dcpio.CheckpointManager(durable, local_root=local, keep_last=2, upload_timeout_s=5)
    mgr.save(1, state_for(1, rank))
    mgr.wait()
    big = {"pad": torch.arange(_BIG, dtype=torch.int64)} if rank == 1 else {}
    mgr.save(2, {**state_for(2, rank), **big})
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    uploader = mgr._uploader
    assert uploader is not None and uploader.wait(120)
    errors = [str(e) for _, e in uploader.take_errors()]
    print(json.dumps({"errors": errors}), flush=True)
    os._exit(0)  # rank 1 is gone: no collective can finish


@pytest.mark.slow
def test_a_rank_dying_during_upload_leaves_the_previous_durable_step(tmp_path: Path) -> None:
    import json

    from helpers import free_port

    durable, local = tmp_path / "durable", tmp_path / "local"
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "dying", str(durable), str(local)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "RANK": str(rank), "MASTER_PORT": port},
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, -signal.SIGKILL], outs
    errors = json.loads(outs[0][0].strip().splitlines()[-1])["errors"]
    assert len(errors) == 1 and "did not finish uploading" in errors[0] and "rank1" in errors[0]
    assert committed(durable) == {1: True, 2: False}  # step 2 never committed there
    got = {**blank_for(0), **blank_for(1)}
    assert dcpio.CheckpointManager(durable).load(got) == 1
    assert_state(got, 1, 0)
    assert_state(got, 1, 1)
    # the job restarts: step 2 is whole in the (shared) local tier, and the next save reaches the durable tier
    mgr = dcpio.CheckpointManager(durable, local_root=local, keep_last=2, leftover_grace_s=0)
    got = {**blank_for(0), **blank_for(1), "pad": torch.zeros(_BIG, dtype=torch.int64)}
    assert mgr.load(got) == 2
    assert_state(got, 2, 0)
    assert_state(got, 2, 1)
    mgr.save(3, state_for(3))  # one rank now: it uploads step 2's files of both former ranks, then step 3
    mgr.close()
    assert committed(durable) == {2: True, 3: True}
    got = {**blank_for(0), **blank_for(1), "pad": torch.zeros(_BIG, dtype=torch.int64)}
    assert dcpio.CheckpointManager(durable).load(got, step=2) == 2
    assert_state(got, 2, 0)
    assert_state(got, 2, 1)


if __name__ == "__main__":
    if sys.argv[1] == "dying":
        _dying_rank(*sys.argv[2:])
    else:
        _child(*sys.argv[1:])

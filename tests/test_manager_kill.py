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


def full_state(step: int) -> dict[str, Any]:
    return {**state_for(step), "pad": torch.arange(_PAD, dtype=torch.int64) * (step + 1)}


def manager(durable: Path, local: Path) -> dcpio.CheckpointManager:
    return dcpio.CheckpointManager(
        durable, keep_last=KEEP_LAST, keep_every=KEEP_EVERY, local_root=local, leftover_grace_s=0
    )


def _child(durable: str, local: str, first: str) -> None:
    mgr = manager(Path(durable), Path(local))
    print("ready", flush=True)
    step = int(first)
    while True:
        if step % 2:
            mgr.async_save(step, full_state(step)).result()
        else:
            mgr.save(step, full_state(step))
        print("saved", step, flush=True)
        step += 1


def committed(root: Path) -> dict[int, bool]:
    tier = Tier(root, name="t")
    return {s: tier.committed(scan) for s, scan in tier.scan().items()}


def check_loads(root: Path, steps: list[int]) -> None:
    mgr = dcpio.CheckpointManager(root)  # no retention: only reads
    for step in steps:
        got = {**blank_for(), "pad": torch.zeros(_PAD, dtype=torch.int64)}
        assert mgr.load(got, step=step) == step
        assert_state(got, step)
        assert bitwise_equal(got["pad"], full_state(step)["pad"]), step


def _run_and_kill(durable: Path, local: Path, first: int, delay: float) -> int:
    """Run the child from ``first``; SIGKILL it ``delay`` s after it is ready. Returns the last step it reported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, str(durable), str(local), str(first)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)  # where the kill lands: not a timing assertion
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        out = proc.stdout.read()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved ")]
    return saved[-1] if saved else first - 1


@pytest.mark.slow
def test_sigkill_during_save_retention_and_upload(tmp_path: Path) -> None:
    durable, local = tmp_path / "durable", tmp_path / "local"
    rng = random.Random(1602)
    first = 1
    reported = 0
    for _ in range(8):
        reported = max(reported, _run_and_kill(durable, local, first, rng.uniform(0.0, 2.5)))
        tiers = {"durable": committed(durable), "local": committed(local)}
        for root, seen in ((durable, tiers["durable"]), (local, tiers["local"])):
            check_loads(root, sorted(s for s, ok in seen.items() if ok))
        newest = max((s for seen in tiers.values() for s, ok in seen.items() if ok), default=0)
        assert newest >= reported  # a save that returned is never lost (it may be local only)

        durable_before = {s for s, ok in tiers["durable"].items() if ok}
        nxt = max([reported, *tiers["durable"], *tiers["local"]]) + 1
        mgr = manager(durable, local)
        mgr.save(nxt, full_state(nxt))
        mgr.close()
        after = committed(durable)
        assert all(after.values()), after  # leftovers swept: nothing in flight, grace 0
        assert sorted(after) == sorted(policy.retained(durable_before | {nxt}, KEEP_LAST, KEEP_EVERY))
        assert committed(local) == {nxt: True}
        check_loads(durable, [nxt])
        first = nxt + 1


if __name__ == "__main__":
    _child(*sys.argv[1:])

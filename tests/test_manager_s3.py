"""CheckpointManager with the durable tier on a real S3 API (moto's server on 127.0.0.1): the conditional commit,
background upload from a local tier, a fresh process resuming from S3, and an uploader killed mid-way."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import dcpio
from dcpio.manager.tiers import Tier, step_name
from helpers import TESTS_DIR, spawn_ranks
from s3_server import FaultProxy, S3Endpoint, fault_proxy, moto, s3, s3_via_proxy  # noqa: F401
from test_manager import assert_state, blank_for, dirs, state_for

pytestmark = pytest.mark.s3


def durable_steps(ep: S3Endpoint, prefix: str) -> dict[int, bool]:
    tier = Tier(ep.url(prefix), name="durable", storage_options=ep.storage_options)
    return {s: tier.committed(scan) for s, scan in tier.scan().items()}


def test_moto_refuses_a_second_conditional_put(moto: Any, s3: S3Endpoint) -> None:  # noqa: F811
    from botocore.exceptions import ClientError

    client = moto.client()
    client.put_object(Bucket=s3.bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=s3.bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    assert client.get_object(Bucket=s3.bucket, Key="k")["Body"].read() == b"1"


def test_s3_commit_once(s3: S3Endpoint) -> None:  # noqa: F811
    mgr = dcpio.CheckpointManager(s3.url("run"), storage_options=s3.storage_options)
    mgr.save(1, state_for(1))
    tier = Tier(s3.url("run"), name="durable", storage_options=s3.storage_options)
    original = tier.mover.read_file(tier.step_path(1, ".metadata"), 1 << 20)
    tier.commit(1, original)  # a retried PUT that finds its own object: not a conflict
    with pytest.raises(dcpio.CheckpointExistsError, match="another writer committed this step first"):
        tier.commit(1, b"a second writer's metadata")
    assert tier.mover.read_file(tier.step_path(1, ".metadata"), 1 << 20) == original
    got = blank_for()
    assert mgr.load(got) == 1
    assert_state(got, 1)


def test_s3_only_retention(s3: S3Endpoint) -> None:  # noqa: F811
    mgr = dcpio.CheckpointManager(s3.url("run"), keep_last=2, storage_options=s3.storage_options)
    for step in (1, 2, 3):
        mgr.save(step, state_for(step))
    assert mgr.steps() == [2, 3] and durable_steps(s3, "run") == {2: True, 3: True}
    got = blank_for()
    assert mgr.load(got, step=2) == 2
    assert_state(got, 2)


def test_upload_runs_in_background_and_its_failure_is_raised(
    tmp_path: Path,
    s3_via_proxy: S3Endpoint,  # noqa: F811
    fault_proxy: FaultProxy,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DCPIO_RETRY_ATTEMPTS", "2")
    ep = s3_via_proxy
    mgr = dcpio.CheckpointManager(
        ep.url("run"), keep_last=2, local_root=tmp_path / "local", storage_options=ep.storage_options
    )
    mgr.save(1, state_for(1))
    mgr.wait()
    assert durable_steps(ep, "run") == {1: True}
    # the store refuses every request for step 2: the save still returns, committed locally
    fault_proxy.inject("503", fraction=1.0, match=step_name(2))
    mgr.save(2, state_for(2))
    assert (tmp_path / "local" / step_name(2) / ".metadata").exists()
    assert mgr._uploader is not None and mgr._uploader.wait(120)
    with pytest.raises(dcpio.CheckpointWriteError, match=r"background upload failed.*step 2"):
        mgr.save(3, state_for(3))
    fault_proxy.clear()
    assert {s for s, ok in durable_steps(ep, "run").items() if ok} == {1}  # the previous durable step is intact
    got = blank_for()
    assert mgr.load(got) == 2  # the local tier holds it
    assert_state(got, 2)
    mgr.save(3, state_for(3))  # uploads step 2 again (once the store is back), then step 3
    mgr.wait()
    assert durable_steps(ep, "run") == {2: True, 3: True}
    got = blank_for()
    assert dcpio.CheckpointManager(ep.url("run"), storage_options=ep.storage_options).load(got, step=2) == 2
    assert_state(got, 2)
    mgr.close()


def rank_two_tiers(rank: int, world: int, url: str, options: dict[str, Any], local: str) -> None:
    mgr = dcpio.CheckpointManager(url, keep_last=2, local_root=local, storage_options=options, leftover_grace_s=0)
    for step in range(1, 6):
        if step % 2:
            mgr.async_save(step, state_for(step, rank)).result()
        else:
            mgr.save(step, state_for(step, rank))
    mgr.wait()
    steps = mgr.steps()
    mgr.close()
    print(json.dumps({"steps": steps}))


def resume_from_s3(url: str, options: dict[str, Any], local: str) -> list[int]:
    mgr = dcpio.CheckpointManager(url, keep_last=2, local_root=local, storage_options=options)
    got = {**blank_for(0), **blank_for(1)}
    step = mgr.load(got)
    assert_state(got, step, 0)
    assert_state(got, step, 1)
    return [step, *mgr.steps()]


@pytest.mark.slow
def test_two_ranks_two_tiers_then_resume_from_s3(tmp_path: Path, s3: S3Endpoint) -> None:  # noqa: F811
    local = tmp_path / "local"
    outs = spawn_ranks(2, "test_manager_s3:rank_two_tiers", [s3.url("run"), s3.storage_options, str(local)], tmp_path)
    for out in outs:
        assert json.loads(out.strip().splitlines()[-1]) == {"steps": [4, 5]}
    # the ranks' exit barrier comes after rank 0's last deletions
    assert durable_steps(s3, "run") == {4: True, 5: True} and dirs(local) == [step_name(5)]
    # a fresh process on another machine: an empty local tier, everything from S3
    assert resume_from_s3(s3.url("run"), s3.storage_options, str(tmp_path / "empty-local")) == [5, 4, 5]


# ---------------------------------------------------------------------------------------------- uploader killed
def _child(url: str, options_json: str, local: str, first: str) -> None:
    """Save ``first`` (durable), then ``first + 1`` with a larger state, and report when it is committed locally."""
    options = json.loads(options_json)
    step = int(first)
    mgr = dcpio.CheckpointManager(url, keep_last=2, local_root=local, storage_options=options, leftover_grace_s=0)
    mgr.save(step, state_for(step))
    mgr.wait()
    print("durable", step, flush=True)
    import torch

    big = {**state_for(step + 1), "pad": torch.arange(6_000_000, dtype=torch.int64)}  # 48 MB: several S3 parts
    mgr.save(step + 1, big)
    print("local", step + 1, flush=True)
    mgr.wait()
    print("durable", step + 1, flush=True)


@pytest.mark.slow
def test_uploader_killed_mid_way_then_resume(tmp_path: Path, s3: S3Endpoint) -> None:  # noqa: F811
    rng = random.Random(16)
    url, options = s3.url("run"), s3.storage_options
    first = 1
    for round_ in range(3):
        local = tmp_path / f"local{round_}"
        cmd = [sys.executable, __file__, url, json.dumps(options), str(local), str(first)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 180
        while not lines or lines[-1] != f"local {first + 1}":
            line = proc.stdout.readline().strip()
            assert line or proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            lines.append(line)
            assert time.monotonic() < deadline
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in step first+1's upload
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
        durable = durable_steps(s3, "run")
        newest = max(s for s, ok in durable.items() if ok)
        assert newest in (first, first + 1)  # the previous durable step, or the new one if its upload finished
        got = blank_for()
        mgr = dcpio.CheckpointManager(url, storage_options=options)
        assert mgr.load(got, step=newest) == newest
        assert_state(got, newest)
        # resume on the same node: the local tier holds first+1 even when S3 does not
        mgr = dcpio.CheckpointManager(url, keep_last=2, local_root=local, storage_options=options, leftover_grace_s=0)
        assert mgr.latest() == first + 1
        got = blank_for()
        assert mgr.load(got) == first + 1
        assert mgr.load(got) == first + 1 and got["step"] == first + 1
        mgr.save(first + 2, state_for(first + 2))
        mgr.close()
        durable = durable_steps(s3, "run")
        # the killed upload of first+1 resumed, and keep_last=2 held once the next save completed
        assert durable == {first + 1: True, first + 2: True}
        check = blank_for()
        assert dcpio.CheckpointManager(url, storage_options=options).load(check, step=first + 1) == first + 1
        assert check["step"] == first + 1
        assert dirs(local) == [step_name(first + 2)]
        first += 3


if __name__ == "__main__":
    _child(*sys.argv[1:])


def test_cli_ls_and_prune_on_s3(s3: S3Endpoint, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from dcpio.cli.main import EXIT_OK, main

    mgr = dcpio.CheckpointManager(s3.url("run"), storage_options=s3.storage_options)
    for step in (1, 2, 3):
        mgr.save(step, state_for(step))
    opts = [f"-o{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in s3.storage_options.items()]
    assert main(["ls", "--json", s3.url("run"), *opts]) == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert [(i["step"], i["tier"], i["committed"]) for i in listed] == [(s, "durable", True) for s in (1, 2, 3)]
    assert all(i["size"] > 0 and i["files"] == 2 for i in listed)
    assert main(["prune", s3.url("run"), "--keep", "1", *opts]) == EXIT_OK
    assert "deleted 2 committed step(s): 1, 2" in capsys.readouterr().out
    assert durable_steps(s3, "run") == {3: True}

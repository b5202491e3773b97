"""The one commit path: exclusive temporary files, one save at a time per directory, save generations.

Every test writes real files (and, for concurrency, runs a real second process); nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpio
from dcpio.commit import GroupCommit, SaveConflictError, SaveLock, publish_bytes, stage_file
from dcpio.commit.saves import generation_of
from helpers import TESTS_DIR, assert_tree_equal, exception_chain, run_stock, spawn_ranks

SRC = str(Path(dcpio.__file__).resolve().parent.parent)


def _sd(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 16, generator=gen), "b": torch.randn(16, generator=gen)}


def _load(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros_like(v) for k, v in like.items()}
    dcp.load(out, storage_reader=dcpio.FileSystemReader(path))
    return out


def _plant(link: Path, outside: Path) -> bytes:
    outside.write_bytes(b"precious bytes outside the checkpoint")
    link.symlink_to(outside)
    return outside.read_bytes()


# ------------------------------------------------------------------------------------------ exclusive temporaries
def test_symlink_at_metadata_tmp_is_not_followed(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    before = _plant(ckpt / ".metadata.tmp", tmp_path / "victim")
    state = _sd(1)
    dcp.save(state, storage_writer=dcpio.FileSystemWriter(ckpt))
    assert (tmp_path / "victim").read_bytes() == before, "the save wrote through the planted symlink"
    assert not (ckpt / ".metadata").is_symlink()
    assert_tree_equal(state, _load(ckpt, state))


def test_stock_torch_follows_a_symlink_at_metadata_tmp(tmp_path: Path) -> None:
    """The contrast row: torch's writer opens ``.metadata.tmp`` with ``open(..., "wb")`` and writes through a link."""
    ckpt = tmp_path / "stock"
    ckpt.mkdir()
    before = _plant(ckpt / ".metadata.tmp", tmp_path / "victim")
    run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        dcp.save({{"w": torch.ones(4)}}, storage_writer=dcp.FileSystemWriter({str(ckpt)!r}))
        """
    )
    assert (tmp_path / "victim").read_bytes() != before, "stock torch no longer follows the link: update the README"


def test_symlink_at_hf_shard_and_index_tmp_is_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    shard = _plant(out / "model-00001-of-00001.safetensors.tmp", tmp_path / "victim_shard")
    index = _plant(out / "model.safetensors.index.json.tmp", tmp_path / "victim_index")
    state = _sd(2)
    dcp.save(state, storage_writer=dcpio.HuggingFaceStorageWriter(out))
    assert (tmp_path / "victim_shard").read_bytes() == shard
    assert (tmp_path / "victim_index").read_bytes() == index
    from safetensors.torch import load_file

    loaded = load_file(out / "model-00001-of-00001.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == dict.fromkeys(
        state, "model-00001-of-00001.safetensors"
    )


def test_safetensors_write_file_tmp_symlink_is_not_followed(tmp_path: Path) -> None:
    from dcpio.formats.safetensors import write_file

    before = _plant(tmp_path / "x.safetensors.tmp", tmp_path / "victim")
    write_file(dcpio.FileSystem(), str(tmp_path / "x.safetensors"), _sd(3))
    assert (tmp_path / "victim").read_bytes() == before
    assert not (tmp_path / "x.safetensors.tmp").exists()


def test_local_open_writer_refuses_an_existing_name(tmp_path: Path) -> None:
    target = tmp_path / "__0_0.distcp"
    target.write_bytes(b"committed data")
    with pytest.raises(FileExistsError):
        dcpio.FileSystem().open_writer(str(target))
    link = tmp_path / "link.distcp"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):  # a dangling link is an existing name too: never created through
        dcpio.FileSystem().open_writer(str(link))
    assert not (tmp_path / "nowhere").exists()
    assert target.read_bytes() == b"committed data"


def test_failed_stage_removes_only_its_temporary_file(tmp_path: Path) -> None:
    final = tmp_path / "model.safetensors"
    final.write_bytes(b"the committed file")
    staged = stage_file(dcpio.FileSystem(), str(final))
    staged.write([memoryview(b"half a new file")])
    assert Path(staged.temp).exists()
    staged.abort()
    assert not Path(staged.temp).exists()
    assert final.read_bytes() == b"the committed file"


def test_group_commit_stages_then_renames_then_publishes_index(tmp_path: Path) -> None:
    fs = dcpio.FileSystem()
    (tmp_path / "a.bin").write_bytes(b"old a")
    group = GroupCommit(fs, str(tmp_path))
    for name in ("a.bin", "b.bin"):
        staged = group.stage(name)
        staged.write([memoryview(name.encode() * 3)])
        staged.finish(sync=True)
    # staged, not yet visible: the committed file is unchanged and the new one absent
    assert (tmp_path / "a.bin").read_bytes() == b"old a"
    assert not (tmp_path / "b.bin").exists()
    group.commit(["a.bin", "b.bin"], "index.json", b"{}", sync=True)
    assert (tmp_path / "a.bin").read_bytes() == b"a.bina.bina.bin"
    assert (tmp_path / "b.bin").read_bytes() == b"b.binb.binb.bin"
    assert (tmp_path / "index.json").read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "index.json"]


def test_publish_bytes_on_memory_store_is_put_last() -> None:
    from dcpio.commit import PutLastCommit, strategy_for
    from dcpio.movers.fsspec import FsspecFileSystem

    fs = FsspecFileSystem("memory://commit-put-last")
    assert isinstance(strategy_for(fs), PutLastCommit)
    publish_bytes(fs, "memory://commit-put-last/.metadata", b"v1", sync=True)
    publish_bytes(fs, "memory://commit-put-last/.metadata", b"v2", sync=True)
    assert fs.fs.cat_file("/commit-put-last/.metadata") == b"v2"
    assert not fs.exists("memory://commit-put-last/.metadata.tmp")


# ------------------------------------------------------------------------------------------ one save at a time
_BLOCKED_SAVER = """
import sys, time, torch, torch.distributed.checkpoint as dcp
from pathlib import Path
import dcpio

ckpt, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

class WaitingFS(dcpio.FileSystem):
    def open_writer(self, path):
        if str(path).endswith(".distcp"):
            ready.write_text("holding the lock")
            deadline = time.monotonic() + 60
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return super().open_writer(path)

gen = torch.Generator().manual_seed(7)
state = {"w": torch.randn(64, 16, generator=gen), "b": torch.randn(16, generator=gen)}
dcp.save(state, storage_writer=dcpio.FileSystemWriter(ckpt, _fs=WaitingFS()))
print("CHILD_SAVED")
"""


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the child never reached its data write")
        time.sleep(0.02)


def test_two_saves_into_one_directory_one_wins(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    old = _sd(1)
    dcp.save(old, storage_writer=dcpio.FileSystemWriter(ckpt))
    script = tmp_path / "saver.py"
    script.write_text(_BLOCKED_SAVER)
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS_DIR])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ckpt), str(ready), str(go)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(ready, proc)
        with pytest.raises(BaseException) as info:
            dcp.save(_sd(2), storage_writer=dcpio.FileSystemWriter(ckpt))
        conflicts = [e for e in exception_chain(info.value) if isinstance(e, SaveConflictError)]
        assert conflicts, [f"{type(e).__name__}: {e}" for e in exception_chain(info.value)]
        message = str(conflicts[0])
        assert f"pid {proc.pid}" in message and socket.gethostname() in message and str(ckpt) in message
        assert_tree_equal(old, _load(ckpt, old))  # the previous checkpoint is still there while the winner writes
    finally:
        go.write_text("go")
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "CHILD_SAVED" in out, err
    assert_tree_equal(_sd(7), _load(ckpt, old))
    assert not (ckpt / ".dcpio.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    doc = {"pid": dead.pid, "host": socket.gethostname(), "save_id": "killed", "started": time.time()}
    (ckpt / ".dcpio.lock").write_text(json.dumps(doc))
    state = _sd(4)
    dcp.save(state, storage_writer=dcpio.FileSystemWriter(ckpt))
    assert_tree_equal(state, _load(ckpt, state))
    assert not (ckpt / ".dcpio.lock").exists()


def test_lock_held_from_another_host_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    doc = {"pid": 1, "host": "some-other-node", "save_id": "elsewhere", "started": time.time()}
    (ckpt / ".dcpio.lock").write_text(json.dumps(doc))
    lock = SaveLock(dcpio.FileSystem(), str(ckpt), "mine")
    with pytest.raises(SaveConflictError, match="some-other-node"):
        lock.acquire()
    assert json.loads((ckpt / ".dcpio.lock").read_text())["save_id"] == "elsewhere"


def test_failed_save_releases_its_lock(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"

    class Full(dcpio.FileSystem):
        def open_writer(self, path: str | os.PathLike[str]) -> dcpio.WriteHandle:  # type: ignore[override]
            if str(path).endswith(".distcp"):
                raise OSError(28, "No space left on device", str(path))
            return super().open_writer(path)

    with pytest.raises(BaseException) as info:
        dcp.save(_sd(5), storage_writer=dcpio.FileSystemWriter(ckpt, _fs=Full()))
    assert any("No space left" in str(e) for e in exception_chain(info.value))
    assert not (ckpt / ".dcpio.lock").exists()
    dcp.save(_sd(6), storage_writer=dcpio.FileSystemWriter(ckpt))


# ------------------------------------------------------------------------------------------ save generations
def test_generation_is_recorded_and_stock_torch_still_loads(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    dcp.save(_sd(1), storage_writer=dcpio.FileSystemWriter(ckpt))
    assert generation_of(dcpio.FileSystemReader(ckpt).read_metadata()) == 1
    out = run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        out = {{"w": torch.zeros(64, 16), "b": torch.zeros(16)}}
        dcp.load(out, storage_reader=dcp.FileSystemReader({str(ckpt)!r}))
        print("STOCK_LOADED", float(out["w"].abs().sum()) > 0)
        """
    )
    assert "STOCK_LOADED True" in out, out


def per_rank_saves(rank: int, world: int, root: str) -> None:
    """Ranks of a per-rank checkpoint; rank 1 dies (never commits) in the second save."""
    import torch.distributed as dist

    def state(version: int) -> dict[str, torch.Tensor]:
        return {"w": torch.full((8,), float(10 * version + rank))}

    dcp.save(state(1), storage_writer=dcpio.FileSystemWriter(f"{root}/pr"), use_collectives=False)
    dist.barrier()
    if rank == 0:
        dcp.save(state(2), storage_writer=dcpio.FileSystemWriter(f"{root}/pr"), use_collectives=False, no_dist=True)
    # over a collective checkpoint: rank 0's per-rank commit must keep what the global metadata names
    dcp.save({"w": torch.full((8,), 1.0)}, storage_writer=dcpio.FileSystemWriter(f"{root}/co"))
    dist.barrier()
    if rank == 0:
        dcp.save(state(3), storage_writer=dcpio.FileSystemWriter(f"{root}/co"), use_collectives=False, no_dist=True)


@pytest.mark.slow
def test_per_rank_load_of_ranks_from_different_saves_names_them(tmp_path: Path) -> None:
    spawn_ranks(2, "test_commit:per_rank_saves", [str(tmp_path)], tmp_path)
    reader = dcpio.FileSystemReader(tmp_path / "pr")
    with pytest.raises(dcpio.IncompleteCheckpointError, match=r"rank 1") as info:
        reader.read_metadata(rank=0)
    assert "rank 0: save 2" in str(info.value) and "rank 1: save 1" in str(info.value)
    with pytest.raises(BaseException) as load_info:
        dcp.load({"w": torch.zeros(8)}, storage_reader=dcpio.FileSystemReader(tmp_path / "pr"))
    assert "different saves" in "".join(str(e) for e in exception_chain(load_info.value))

    co = tmp_path / "co"
    named = {i.relative_path for i in _global_storage(co)}
    assert named and all((co / n).is_file() for n in named), "a per-rank commit removed the previous checkpoint's files"
    with pytest.raises(dcpio.IncompleteCheckpointError, match="superseded"):  # dcp.load then tries per-rank files
        dcpio.FileSystemReader(co).read_metadata()
    with pytest.raises(BaseException, match=r"__1\.metadata"):
        dcpio.FileSystemReader(co).read_metadata(rank=1)


def _global_storage(path: Path) -> list[object]:
    from dcpio.integrity.safe_pickle import load_metadata

    md = load_metadata((path / ".metadata").read_bytes(), str(path / ".metadata"))
    return list(md.storage_data.values())


def test_collective_save_supersedes_per_rank_metadata(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    dcp.save(_sd(1), storage_writer=dcpio.FileSystemWriter(ckpt), use_collectives=False)
    assert (ckpt / "__0.metadata").is_file()
    state = _sd(2)
    dcp.save(state, storage_writer=dcpio.FileSystemWriter(ckpt))
    assert not (ckpt / "__0.metadata").exists()
    assert_tree_equal(state, _load(ckpt, state))
    assert generation_of(dcpio.FileSystemReader(ckpt).read_metadata()) == 2


# ------------------------------------------------------------------------------------------ torch-style backends
def test_torch_filesystem_assigned_to_writer_fs_and_reader_fs(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystem as TorchFileSystem

    class ThirdParty(TorchFileSystem):
        """Implements only torch's interface (torch's own local class, as third-party code subclasses it)."""

    writer = dcpio.FileSystemWriter(tmp_path / "ck")
    writer.fs = ThirdParty()
    state = _sd(8)
    dcp.save(state, storage_writer=writer)
    reader = dcpio.FileSystemReader(tmp_path / "ck")
    reader.fs = ThirdParty()
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=reader)
    assert_tree_equal(state, out)
    with pytest.raises(TypeError, match="not a file system"):
        writer.fs = object()


def test_blocked_saver_script_is_valid_python() -> None:
    compile(textwrap.dedent(_BLOCKED_SAVER), "saver", "exec")


# ------------------------------------------------------------------------------------------ full disks
@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs under ``tmp_path`` (skipped where mounting is not allowed); always unmounted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_hf_export_on_a_full_disk_names_the_file_and_leaves_no_partial_file(small_tmpfs: Path) -> None:
    out = small_tmpfs / "hf"
    small = {"w": torch.ones(1024)}
    dcp.save(small, storage_writer=dcpio.HuggingFaceStorageWriter(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    big = {"w": torch.ones(1024), "big": torch.ones(2 << 20)}  # 8 MiB: more than the disk holds
    with pytest.raises(BaseException) as info:
        dcp.save(big, storage_writer=dcpio.HuggingFaceStorageWriter(out))
    full = [e for e in exception_chain(info.value) if isinstance(e, dcpio.StorageFullError)]
    assert full, [f"{type(e).__name__}: {e}" for e in exception_chain(info.value)]
    assert str(out / "model-00001-of-00001.safetensors") in str(full[0]) and "no space" in str(full[0]).lower()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a partial file or a changed file was left"


def test_stream_backend_on_a_full_device_reports_storage_full(tmp_path: Path) -> None:
    from test_mover_conformance import StreamOnlyFileSystem

    class DevFull(StreamOnlyFileSystem):
        """Data files go to /dev/full: every write fails with ENOSPC, as on a full disk."""

        @contextmanager
        def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
            target = "/dev/full" if str(path).endswith(".distcp") and "w" in mode else path
            with open(target, mode) as stream:
                yield stream

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    writer = dcpio.FileSystemWriter(tmp_path / "ck")
    writer.fs = DevFull()
    with pytest.raises(BaseException) as info:
        dcp.save({"w": torch.ones(1 << 16)}, storage_writer=writer)
    full = [e for e in exception_chain(info.value) if isinstance(e, dcpio.StorageFullError)]
    assert full and str(tmp_path / "ck" / "__0_0.distcp") in str(full[0]), [str(e) for e in exception_chain(info.value)]
    assert not (tmp_path / "ck" / ".metadata").exists()


def test_lock_leftovers_of_a_killed_process_are_swept(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    leftover = ckpt / f".dcpio.lock.{host}.{dead.pid}.1234.new"  # killed between writing and linking its lock
    leftover.write_text("{}")
    alive = ckpt / f".dcpio.lock.{host}.{os.getpid()}.1234.new"  # a live process's: never touched
    alive.write_text("{}")
    dcp.save(_sd(9), storage_writer=dcpio.FileSystemWriter(ckpt))
    assert not leftover.exists() and alive.exists()


def test_a_taken_data_file_name_fails_the_save_and_is_not_removed(tmp_path: Path) -> None:
    """A listing that misses a committed file (a racing writer, a stale cache): the save must not write through the
    name, and its rollback must not remove a file it did not create."""
    ckpt = tmp_path / "ckpt"
    old = _sd(1)
    dcp.save(old, storage_writer=dcpio.FileSystemWriter(ckpt, thread_count=1))
    committed = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert "__0_0.distcp" in committed

    class StaleListing(dcpio.FileSystem):
        def ls(self, path: str | os.PathLike[str]) -> list[str]:
            return [p for p in super().ls(path) if not p.endswith("__0_0.distcp")]

    with pytest.raises(BaseException) as info:
        dcp.save(_sd(2), storage_writer=dcpio.FileSystemWriter(ckpt, thread_count=1, _fs=StaleListing()))
    assert any(isinstance(e, FileExistsError) for e in exception_chain(info.value))
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == committed
    assert_tree_equal(old, _load(ckpt, old))

"""dcpio's fsspec classes on ``memory://`` and ``file://`` URLs: round trips through ``dcp.save``/``dcp.load``,
overwrite safety, the byte mover's contract, and compatibility with torch's own ``FsspecWriter``/``FsspecReader``
(the torch side in a subprocess that never imports dcpio). S3 is covered by ``test_s3.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpio
from dcpio.errors import CheckpointError, CorruptCheckpointError
from dcpio.movers.fsspec import FsspecFileSystem
from helpers import assert_tree_equal, exception_chain, make_state_dict, run_stock, template_like, trusted_objects


@pytest.fixture
def mem_url() -> Iterator[str]:
    """A fresh ``memory://`` checkpoint URL, removed afterwards (the memory store is process-wide)."""
    name = f"dcpio-test-{uuid.uuid4().hex[:10]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _load(template: Any, url: str, **kw: Any) -> Any:
    with trusted_objects():
        dcp.load(template, storage_reader=dcpio.FsspecReader(url, **kw))
    return template


def _names(url: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in FsspecFileSystem(url).ls(url))


# ------------------------------------------------------------------------------------------------ memory://
def test_memory_round_trip_and_overwrite(mem_url: str) -> None:
    first, second = make_state_dict(seed=1), make_state_dict(seed=2)
    dcp.save(first, storage_writer=dcpio.FsspecWriter(mem_url, thread_count=2))
    assert_tree_equal(first, _load(template_like(first), mem_url))
    old_files = set(_names(mem_url)) - {".metadata"}
    assert old_files and all(n.endswith(".distcp") for n in old_files)
    # overwrite, with compression: new per-save names, the old files removed once the new metadata commits
    dcp.save(second, storage_writer=dcpio.FsspecWriter(mem_url, _extensions=[dcpio.ZStandard()]))
    assert_tree_equal(second, _load(template_like(second), mem_url))
    assert not (old_files & set(_names(mem_url)))
    # checkpoint_id passed to dcp.save reaches the writer through reset()
    other = mem_url + "-b"
    try:
        dcp.save(first, checkpoint_id=other, storage_writer=dcpio.FsspecWriter(mem_url))
        assert_tree_equal(first, _load(template_like(first), other))
    finally:
        fsspec.filesystem("memory").rm(other.removeprefix("memory:/"), recursive=True)


def test_memory_failed_save_keeps_the_old_checkpoint(mem_url: str) -> None:
    old = make_state_dict(seed=3)
    dcp.save(old, storage_writer=dcpio.FsspecWriter(mem_url))
    before = {n: FsspecFileSystem(mem_url).read_file(f"{mem_url}/{n}", 1 << 30) for n in _names(mem_url)}
    broken = make_state_dict(seed=4)
    broken["unpicklable"] = lambda: None  # fails while the new save writes its data
    with pytest.raises(BaseException) as info:
        dcp.save(broken, storage_writer=dcpio.FsspecWriter(mem_url))
    assert any("unpicklable" in str(e) or "pickle" in str(e).lower() for e in exception_chain(info.value))
    mover = FsspecFileSystem(mem_url)
    assert {n: mover.read_file(f"{mem_url}/{n}", 1 << 30) for n in before} == before
    assert_tree_equal(old, _load(template_like(old), mem_url))


def test_memory_mover_contract(mem_url: str) -> None:
    mover = FsspecFileSystem(mem_url)
    assert mover.supports_atomic_rename is False and mover.local_root(mem_url) is None
    assert FsspecFileSystem.validate_checkpoint_id(mem_url) and not FsspecFileSystem.validate_checkpoint_id("a/b")
    assert dcpio.FsspecWriter.validate_checkpoint_id(mem_url) and dcpio.FsspecReader.validate_checkpoint_id(mem_url)
    assert not dcpio.FsspecWriter.validate_checkpoint_id(Path("/tmp/x"))
    mover.mkdir(mem_url)
    url = mover.concat_path(mem_url, "a.bin")
    handle = mover.open_writer(url)
    data = os.urandom(300_000)
    handle.write([memoryview(data)[:1000], memoryview(data)[1000:]])
    handle.sync()  # no descriptor behind it: must not call fsync or fileno
    assert handle.tell() == len(data)
    handle.close()
    assert mover.exists(url)
    reader = mover.open_reader(url)
    assert reader.size() == len(data)
    buf = bytearray(5000)
    reader.readinto(123_456, memoryview(buf))
    assert bytes(buf) == data[123_456:128_456]
    with pytest.raises(CorruptCheckpointError, match=r"a\.bin"):
        reader.readinto(len(data) - 10, memoryview(bytearray(20)))
    mover.write_file_atomic(mover.concat_path(mem_url, ".metadata"), b"meta", sync=True)
    assert mover.read_file(mover.concat_path(mem_url, ".metadata"), 10) == b"meta"
    with pytest.raises(CorruptCheckpointError, match="cap"):
        mover.read_file(url, 10)
    assert mover.ls(mem_url) == [f"{mem_url}/.metadata", f"{mem_url}/a.bin"]
    mover.remove_quietly(url)
    mover.remove_quietly(url)
    assert not mover.exists(url)
    with pytest.raises(FileNotFoundError, match=r"a\.bin"):
        mover.read_file(url, 10)
    # torch's stream interface still works
    with mover.create_stream(url, "wb") as stream:
        stream.write(b"abc")
    with mover.create_stream(url, "rb") as stream:
        assert stream.read() == b"abc"


# ------------------------------------------------------------------------------------------------ file://
def test_file_url_round_trip_uses_local_guarantees(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/ck"
    mover = FsspecFileSystem(url)
    assert mover.supports_atomic_rename is True
    assert mover.local_root(url) == os.path.realpath(tmp_path / "ck")
    old, new = make_state_dict(seed=5), make_state_dict(seed=6)
    dcp.save(old, storage_writer=dcpio.FsspecWriter(url, thread_count=2))
    assert_tree_equal(old, _load(template_like(old), url))
    # the same files load through the local reader: file:// is only a spelling of the path
    with trusted_objects():
        out = template_like(old)
        dcp.load(out, storage_reader=dcpio.FileSystemReader(tmp_path / "ck"))
    assert_tree_equal(old, out)

    # a save that fails at its commit point (the metadata's temporary name is taken by a directory) keeps the
    # old checkpoint, bit for bit
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    (tmp_path / "ck" / ".metadata.tmp").mkdir()
    with pytest.raises(BaseException) as info:
        dcp.save(new, storage_writer=dcpio.FsspecWriter(url))
    assert any(".metadata" in str(e) for e in exception_chain(info.value))
    assert {n: (tmp_path / "ck" / n).read_bytes() for n in before} == before
    assert_tree_equal(old, _load(template_like(old), url))
    (tmp_path / "ck" / ".metadata.tmp").rmdir()
    dcp.save(new, storage_writer=dcpio.FsspecWriter(url))
    assert_tree_equal(new, _load(template_like(new), url))
    assert not (set(before) - {".metadata"}) & {p.name for p in (tmp_path / "ck").iterdir()}


_STOCK = """
import json, traceback
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from helpers import assert_tree_equal, make_state_dict, template_like
"""


def test_file_url_compat_with_torch_fsspec_both_ways(tmp_path: Path) -> None:
    by_torch, by_dcpio = f"file://{tmp_path}/by_torch", f"file://{tmp_path}/by_dcpio"
    run_stock(
        _STOCK
        + f"""
dcp.save(make_state_dict(seed=40), storage_writer=FsspecWriter({by_torch!r}))
dcp.save(make_state_dict(seed=41), storage_writer=FsspecWriter({by_torch!r}, thread_count=2))
"""
    )
    expected = make_state_dict(seed=41)
    assert_tree_equal(expected, _load(template_like(expected), by_torch))

    dcp.save(make_state_dict(seed=50), storage_writer=dcpio.FsspecWriter(by_dcpio, thread_count=3))
    dcp.save(make_state_dict(seed=51), storage_writer=dcpio.FsspecWriter(by_dcpio, _extensions=[dcpio.ZStandard()]))
    run_stock(
        _STOCK
        + f"""
expected = make_state_dict(seed=51)
out = template_like(expected)
dcp.load(out, storage_reader=FsspecReader({by_dcpio!r}))
assert_tree_equal(expected, out)
"""
    )


# ------------------------------------------------------------------------------------------------ set-up errors
def test_missing_package_and_unknown_protocol_are_explained() -> None:
    code = """
import sys
sys.modules["s3fs"] = None  # as if s3fs were not installed
from dcpio.movers.fsspec import FsspecFileSystem
from dcpio.errors import CheckpointError
try:
    FsspecFileSystem("s3://bucket/ckpt")
except CheckpointError as err:
    print("ERR", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "ERR s3://bucket/ckpt" in out.stdout and "install s3fs" in out.stdout.lower(), out.stdout + out.stderr
    with pytest.raises(CheckpointError, match="nosuchproto://x"):
        FsspecFileSystem("nosuchproto://x/ckpt")


def test_writer_keywords_match_torch_positional_order(mem_url: str) -> None:
    # torch's FsspecWriter takes overwrite sixth; a positional call written for torch must mean the same here
    writer = dcpio.FsspecWriter(mem_url, True, False, 2, 1_000_000, False)
    assert writer.overwrite is False and writer.sync_files is False and writer.thread_count == 2
    dcp.save({"a": torch.ones(3)}, storage_writer=writer)
    with pytest.raises(BaseException) as info:
        dcp.save({"a": torch.zeros(3)}, storage_writer=dcpio.FsspecWriter(mem_url, True, False, 2, 1_000_000, False))
    assert any(isinstance(e, dcpio.CheckpointExistsError) for e in exception_chain(info.value))
    assert json.dumps(_names(mem_url))  # still there
    out = {"a": torch.zeros(3)}
    dcp.load(out, storage_reader=dcpio.FsspecReader(mem_url))
    assert torch.equal(out["a"], torch.ones(3))
